"""`prefalign dpo`: offline DPO on preference pairs, or iterative (on-policy) DPO with `--rounds K`.

The command's config is IterativeDPOConfig with rounds = 1 by default: one round is plain DPO on data.path's
pairs (prefalign.algorithms.dpo), more rounds run the iterative recipe (prefalign.recipes.iterative_dpo).
"""

from __future__ import annotations

from dataclasses import dataclass

from prefalign.algorithms import dpo as algorithm
from prefalign.algorithms.dpo import DPOConfig
from prefalign.commands.builtin import resolve_builtin
from prefalign.config import validate
from prefalign.options import option
from prefalign.recipes.iterative_dpo import IterativeDPOConfig, iterative_dpo, plain_dpo_config
from prefalign.runtime.loop import TrainResult


@dataclass
class DPOCommandConfig(IterativeDPOConfig):
    rounds: int = option(
        1,
        "Iterative (on-policy) DPO: rounds of sample -> pairs -> DPO with the current policy "
        "(train.max_steps per round, else train.epochs over its pairs); 1 = offline DPO on data.path's "
        "pairs.",
        low=1,
    )

    def check(self, prefix: str = "") -> None:
        # One round is plain DPO: the iterative rules (pair strategy, no resume, ...) do not apply.
        if self.rounds == 1:
            DPOConfig.check(self, prefix)
        else:
            IterativeDPOConfig.check(self, prefix)


def dpo(
    config: DPOConfig, *, dataset=None, eval_dataset=None, model=None, tokenizer=None, reference=None,
    save: bool = True,
) -> TrainResult:
    """Check the config, resolve `builtin`, then run plain DPO, or iterative DPO when `config` has rounds > 1
    (keyword arguments as prefalign.algorithms.dpo.dpo takes them)."""
    validate(config)
    dataset, eval_dataset = resolve_builtin(
        config, "preference", dataset=dataset, eval_dataset=eval_dataset, model=model,
    )
    inputs = dict(
        dataset=dataset, eval_dataset=eval_dataset, model=model, tokenizer=tokenizer, reference=reference,
        save=save,
    )
    if isinstance(config, IterativeDPOConfig) and config.rounds != 1:
        return iterative_dpo(config, **inputs)
    return algorithm.dpo(config if type(config) is DPOConfig else plain_dpo_config(config), **inputs)
