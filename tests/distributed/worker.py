"""Runs `prefalign <command> ...` in one process or under torchrun, with test hooks around the optimizer step:

- PREFALIGN_TEST_GRADS=<folder>: after step 1's backward (gradients all-reduced, or FSDP's shards
  gathered), this rank's gradients are saved to <folder>/rank-<r>.safetensors, before clipping.
- PREFALIGN_TEST_DIE_AT=<step>:<rank>: that rank SIGKILLs itself at the start of that optimizer step (no
  cleanup, as when a node dies).
"""

from __future__ import annotations

import os
import signal
import sys

from safetensors.torch import save_file

from prefalign.cli import main
from prefalign.runtime import distributed, loop

real_clip_and_step = loop.clip_and_step
calls = {"steps": 0}


def clip_and_step(model, optimizer, scheduler, max_grad_norm):
    calls["steps"] += 1
    folder = os.environ.get("PREFALIGN_TEST_GRADS")
    if folder and calls["steps"] == 1:
        grads = {  # FSDP's gradients are shards (DTensors): gathered whole, on every rank in the same order
            name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
            for name, p in model.named_parameters() if p.grad is not None
        }  # fmt: skip
        save_file(grads, os.path.join(folder, f"rank-{distributed.rank()}.safetensors"))
    return real_clip_and_step(model, optimizer, scheduler, max_grad_norm)


def accumulate(*args, **kwargs):
    die_at = os.environ.get("PREFALIGN_TEST_DIE_AT")
    if die_at:
        step, rank = map(int, die_at.split(":"))
        if calls["steps"] + 1 == step and distributed.rank() == rank:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_accumulate(*args, **kwargs)


real_accumulate = loop.accumulate
loop.clip_and_step = clip_and_step
loop.accumulate = accumulate

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
