"""A coarse reward for the distributed GRPO and PPO tests (the CLI loads tests.distributed.rewards:...): a
random tiny model earns it about a quarter of the time, so some groups have all-equal rewards (dynamic
sampling drops them and samples again) and the others have a spread to learn from."""


def starts_with_digit(prompts, completions, **_columns) -> list[float]:
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [float(text[:1].isdigit()) for text in texts]
