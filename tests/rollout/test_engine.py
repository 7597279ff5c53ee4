"""The rollout engine against first principles (a full forward pass) and against `model.generate`."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prefalign.rollout.engine import LocalEngine, generate
from prefalign.rollout.types import RolloutBackend, Sample, SamplingParams
from prefalign.tasks.tokenizer import build_char_tokenizer

MAX_NEW = 12


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        # Wider than the default 0.02 so the logits are peaked: greedy argmax must not hinge on float noise.
        initializer_range=0.2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """Chat-rendered prompts of different lengths (so batches are left-padded)."""
    contents = ["12+34", "7+8", "a longer prompt: 99+1", "hi"]
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)[
            "input_ids"
        ]
        for content in contents
    ]


@pytest.fixture
def eos_bias(model, tokenizer):
    """Add a constant to the EOS logit, to make rows end early (or at once) on purpose."""
    handles = []

    def apply(bias: float):
        def hook(_module, _inputs, output):
            output.logits[..., tokenizer.eos_token_id] += bias
            return output

        handles.append(model.register_forward_hook(hook))

    yield apply
    for handle in handles:
        handle.remove()


def reference_logprobs(model, prompt: list[int], sample: Sample, temperature: float) -> list[float]:
    """log_softmax(logits / T) over the full vocabulary from one forward pass over prompt + completion."""
    input_ids = torch.tensor([prompt + sample.token_ids])
    with torch.no_grad():
        logits = model(input_ids).logits[0].float()  # (seq, vocab)
    # The logits at position t-1 score token t.
    completion_logits = logits[len(prompt) - 1 : -1] / temperature
    logprobs = torch.log_softmax(completion_logits, dim=-1)
    return logprobs.gather(1, torch.tensor(sample.token_ids).unsqueeze(1)).squeeze(1).tolist()


def hf_greedy(model, tokenizer, prompt: list[int], max_new_tokens: int) -> list[int]:
    """model.generate on one prompt alone; new tokens up to and including EOS."""
    output = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return output[0, len(prompt) :].tolist()


def test_shapes_and_length_finish(model, tokenizer, prompts):
    engine = LocalEngine(model, tokenizer)
    assert isinstance(engine, RolloutBackend)
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=MAX_NEW, seed=0, ignore_eos=True)
    results = engine.generate(prompts, params)
    assert len(results) == len(prompts)
    for samples in results:
        assert len(samples) == 3
        for sample in samples:
            assert len(sample.token_ids) == len(sample.logprobs) == MAX_NEW
            assert sample.finish_reason == "length"
            assert sample.text == tokenizer.decode(sample.token_ids, skip_special_tokens=True)
    assert engine.generate([], params) == []


def test_eos_finish_and_ignore_eos(model, tokenizer, prompts, eos_bias):
    eos_bias(100.0)  # EOS is now (almost) certain at every step
    results = generate(model, tokenizer, prompts, SamplingParams(n=2, max_new_tokens=MAX_NEW, seed=0))
    for sample in (sample for samples in results for sample in samples):
        assert sample.token_ids == [tokenizer.eos_token_id]
        assert sample.finish_reason == "eos" and sample.text == ""
        assert sample.logprobs[0] == pytest.approx(0.0, abs=1e-5)

    ignoring = generate(model, tokenizer, prompts, SamplingParams(max_new_tokens=5, seed=0, ignore_eos=True))
    for (sample,) in ignoring:
        assert sample.token_ids == [tokenizer.eos_token_id] * 5 and sample.finish_reason == "length"


def test_stop_token_and_stop_string(model, tokenizer, prompts):
    engine = LocalEngine(model, tokenizer)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW, ignore_eos=True)
    (full,) = engine.generate([prompts[0]], greedy)[0]
    full_text = tokenizer.decode(full.token_ids, skip_special_tokens=True)

    stop_token = full.token_ids[4]
    greedy.stop_token_ids = [stop_token]
    (stopped,) = engine.generate([prompts[0]], greedy)[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == full.token_ids[: full.token_ids.index(stop_token) + 1]

    stop_string = full_text[3:5]
    greedy.stop_token_ids = None
    greedy.stop_strings = ["never appears \x00", stop_string]
    (cut,) = engine.generate([prompts[0]], greedy)[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full_text[: full_text.find(stop_string)]
    # It stops on the token that completes the stop string, and keeps that token.
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)]
    assert stop_string in tokenizer.decode(cut.token_ids, skip_special_tokens=True)
    assert stop_string not in tokenizer.decode(cut.token_ids[:-1], skip_special_tokens=True)


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (20, 0.9)])
def test_logprobs_equal_a_full_forward_pass(model, tokenizer, prompts, top_k, top_p):
    temperature = 0.7
    params = SamplingParams(
        n=3, temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=MAX_NEW, seed=3
    )
    results = LocalEngine(model, tokenizer).generate(prompts, params)
    for prompt, samples in zip(prompts, results, strict=True):
        for sample in samples:
            expected = reference_logprobs(model, prompt, sample, temperature)
            torch.testing.assert_close(
                torch.tensor(sample.logprobs), torch.tensor(expected), atol=1e-4, rtol=1e-4
            )


def test_greedy_logprobs_use_temperature_one(model, tokenizer, prompts):
    results = generate(model, tokenizer, prompts, SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW))
    for prompt, (sample,) in zip(prompts, results, strict=True):
        expected = reference_logprobs(model, prompt, sample, 1.0)
        torch.testing.assert_close(
            torch.tensor(sample.logprobs), torch.tensor(expected), atol=1e-4, rtol=1e-4
        )


def test_filters_shape_the_draw(model, tokenizer, prompts):
    """top_k = 1, or a tiny top_p, leaves only the argmax: sampling must then equal greedy."""
    greedy = generate(model, tokenizer, prompts, SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW))
    greedy_tokens = [samples[0].token_ids for samples in greedy]
    for filters in ({"top_k": 1}, {"top_p": 1e-6}):
        params = SamplingParams(n=2, temperature=1.5, max_new_tokens=MAX_NEW, seed=1, **filters)
        sampled = generate(model, tokenizer, prompts, params)
        assert [[sample.token_ids for sample in samples] for samples in sampled] == [
            [tokens, tokens] for tokens in greedy_tokens
        ]


def test_seed_is_deterministic(model, tokenizer, prompts):
    engine = LocalEngine(model, tokenizer)

    def run(seed):
        params = SamplingParams(n=4, temperature=1.0, top_p=0.95, max_new_tokens=MAX_NEW, seed=seed)
        return [[(s.token_ids, s.logprobs) for s in samples] for samples in engine.generate(prompts, params)]

    assert run(7) == run(7)
    assert run(7) != run(8)
    # The n samples of one prompt are independent draws, not copies.
    first_prompt = run(7)[0]
    assert len({tuple(tokens) for tokens, _ in first_prompt}) > 1


def test_greedy_matches_hf_generate(model, tokenizer, prompts):
    expected = [hf_greedy(model, tokenizer, prompt, MAX_NEW) for prompt in prompts]
    params = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW)
    one_at_a_time = [generate(model, tokenizer, [prompt], params)[0][0].token_ids for prompt in prompts]
    assert one_at_a_time == expected
    # The same prompts left-padded in one batch, and split into batches of 3 sequences.
    for batch_size in (64, 3):
        batched = generate(model, tokenizer, prompts, params, batch_size=batch_size)
        assert [samples[0].token_ids for samples in batched] == expected


def test_finished_rows_leave_the_batch_and_prefill_runs_once(model, tokenizer, prompts, eos_bias):
    eos_bias(3.0)  # EOS likely enough that rows end at different steps
    batch_sizes = []
    handle = model.register_forward_pre_hook(
        lambda _m, _a, kwargs: batch_sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        engine = LocalEngine(model, tokenizer)
        params = SamplingParams(n=8, temperature=1.0, max_new_tokens=MAX_NEW, seed=0)
        results = engine.generate(prompts, params)
    finally:
        handle.remove()
    samples = [sample for group in results for sample in group]
    stats = engine.last_stats

    assert stats["prefill_tokens"] == sum(len(prompt) for prompt in prompts)  # not 8x
    assert batch_sizes[0] == len(prompts)  # one prefill row per prompt
    # Every decode step feeds exactly the rows still running: a sample of L tokens costs L - 1 steps.
    assert stats["decode_tokens"] == sum(batch_sizes[1:]) == sum(len(s.token_ids) - 1 for s in samples)
    assert batch_sizes[1:] == sorted(batch_sizes[1:], reverse=True)
    assert stats["decode_tokens"] < len(samples) * (MAX_NEW - 1)
    assert {"eos", "length"} <= {s.finish_reason for s in samples}
    for sample in samples:
        assert (sample.token_ids[-1] == tokenizer.eos_token_id) == (sample.finish_reason == "eos")
        assert tokenizer.eos_token_id not in sample.token_ids[:-1]


def test_restores_train_mode(model, tokenizer, prompts):
    model.train()
    model.model.layers[0].eval()  # a submodule deliberately left in eval mode stays so
    try:
        generate(model, tokenizer, prompts[:1], SamplingParams(max_new_tokens=2, seed=0))
        assert model.training and model.model.layers[1].training
        assert not model.model.layers[0].training
    finally:
        model.eval()


@pytest.mark.parametrize(
    "bad",
    [
        {"n": 0},
        {"temperature": -1.0},
        {"top_p": 0.0},
        {"top_k": -1},
        {"max_new_tokens": 0},
        {"stop_strings": [""]},
    ],
)
def test_rejects_bad_params(model, tokenizer, prompts, bad):
    with pytest.raises(ValueError):
        generate(model, tokenizer, prompts, SamplingParams(**bad))


def test_rejects_empty_prompt(model, tokenizer):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, tokenizer, [[1, 2], []], SamplingParams())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(model, tokenizer, prompts):
    cuda_model = LlamaForCausalLM(model.config).to("cuda").eval()
    cuda_model.load_state_dict(model.state_dict())
    params = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW)
    on_cpu = generate(model, tokenizer, prompts, params)
    on_cuda = generate(cuda_model, tokenizer, prompts, params)
    assert [s[0].token_ids for s in on_cuda] == [s[0].token_ids for s in on_cpu]
    sampled = generate(
        cuda_model, tokenizer, prompts, SamplingParams(n=4, temperature=0.7, top_p=0.9, seed=0)
    )
    for prompt, samples in zip(prompts, sampled, strict=True):
        for sample in samples:
            expected = reference_logprobs(model, prompt, sample, 0.7)
            torch.testing.assert_close(
                torch.tensor(sample.logprobs), torch.tensor(expected), atol=1e-3, rtol=1e-3
            )


def test_a_prompts_samples_follow_its_key_not_its_batch(model, tokenizer, prompts):
    """Keyed sampling: the same (seed, key) gives the same samples whether the prompt runs with the others, in
    reverse order, alone in batches of one sequence, or in another call: what multi-process training needs
    (a prompt is sampled by whichever rank holds it, keyed by its global index)."""
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=MAX_NEW, seed=11)

    def tokens(results):
        return [[sample.token_ids for sample in samples] for samples in results]

    together = tokens(LocalEngine(model, tokenizer).generate(prompts, params))
    keys = list(range(len(prompts)))
    backwards = tokens(LocalEngine(model, tokenizer).generate(prompts[::-1], params, keys=keys[::-1]))
    assert backwards[::-1] == together
    one_by_one = LocalEngine(model, tokenizer, batch_size=3)
    assert [tokens(one_by_one.generate([p], params, keys=[k]))[0] for k, p in enumerate(prompts)] == together
    # Another key (or seed) is another stream.
    assert tokens(LocalEngine(model, tokenizer).generate(prompts, params, keys=[k + 100 for k in keys])) != (
        together
    )
    with pytest.raises(ValueError, match="one key per prompt"):
        LocalEngine(model, tokenizer).generate(prompts, params, keys=[0])


def test_keyed_draws_follow_the_distribution():
    """Inverse-CDF draws from the keyed uniforms: frequencies match softmax(logits / T) over 200k rows (each
    within 4 standard errors), and a token top-k filtered out is never drawn."""
    from prefalign.rollout.engine import keyed_uniforms, sample_next_tokens, stream_key

    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5, -3.0])
    rows = 200_000
    streams = torch.tensor([stream_key(5, key, 0) for key in range(rows)])
    for step, (temperature, top_k) in enumerate(((1.0, 0), (0.7, 0), (1.0, 3))):
        params = SamplingParams(temperature=temperature, top_k=top_k)
        tokens, _ = sample_next_tokens(logits.expand(rows, -1).clone(), params, keyed_uniforms(streams, step))
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_k:
            kept = probs >= probs.topk(top_k).values[-1]
            probs = torch.where(kept, probs, 0.0) / probs[kept].sum()
        frequencies = torch.bincount(tokens, minlength=len(logits)).double() / rows
        errors = (probs.double() * (1 - probs.double()) / rows).sqrt()
        assert ((frequencies - probs.double()).abs() <= 4 * errors + 1e-12).all(), (frequencies, probs)
        if top_k:
            assert frequencies[~kept].sum() == 0
