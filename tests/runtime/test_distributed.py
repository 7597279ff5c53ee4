"""The distributed seam with one process (no process group): every function is the identity, so training on
one process is exactly what it was before the seam existed."""

from __future__ import annotations

import torch

from prefalign.runtime import distributed


def test_one_process_is_the_identity():
    assert not torch.distributed.is_initialized()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main_process()) == (0, 1, True)
    assert distributed.sum_across(3.5) == 3.5
    values = torch.tensor([1.0, 2.0])
    assert torch.equal(distributed.sum_tensor_across(values), values)
    assert distributed.gather_across([{"a": 1}, 2]) == [{"a": 1}, 2]
