"""Token log-probs, entropy and masked reductions."""

import pytest
import torch

from prefalign.losses import masked_mean, masked_sum, token_entropy, token_logprobs


def assert_values(actual, expected, atol=1e-6):
    """Compare a tensor with nested literal lists (pytest.approx takes flat ones only)."""
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def test_token_logprobs_by_hand():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.5, 1.0, 1.5]]])
    targets = torch.tensor([[2, 0]])
    # 3 − log(e + e² + e³) = 3 − 3.407606 = −0.407606; the second row is the first halved:
    # 0.5 − logsumexp(0.5, 1, 1.5) = 0.5 − 2.180270 = −1.680270
    assert_values(token_logprobs(logits, targets), [[-0.407606, -1.680270]])
    # temperature 2 on the first row gives the second row's distribution: 1.5 − 2.180270 = −0.680270
    assert token_logprobs(logits[:, :1], targets[:, :1], temperature=2.0).item() == pytest.approx(
        -0.680270, abs=1e-6
    )


def random_case(dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 7, 11, generator=generator)).to(dtype)
    targets = torch.randint(0, 11, (2, 7), generator=generator)
    return logits, targets


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_matches_log_softmax_and_chunking(temperature):
    logits, targets = random_case()
    logits.requires_grad_(True)
    reference = torch.log_softmax(logits / temperature, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    whole = token_logprobs(logits, targets, temperature=temperature)
    chunked = token_logprobs(logits, targets, temperature=temperature, chunk_size=3)
    torch.testing.assert_close(whole, reference)
    torch.testing.assert_close(chunked, whole)
    (reference_gradient,) = torch.autograd.grad(reference.sum(), logits)
    (chunked_gradient,) = torch.autograd.grad(chunked.sum(), logits)
    torch.testing.assert_close(chunked_gradient, reference_gradient)


def test_token_logprobs_upcasts_half_precision():
    logits, targets = random_case(torch.bfloat16)
    result = token_logprobs(logits, targets, chunk_size=2)
    assert result.dtype == torch.float32
    reference = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(result, reference)


def test_token_logprobs_shape_check():
    with pytest.raises(ValueError, match="line up"):
        token_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), temperature=0.0)


def test_token_entropy():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, 1.0986123, -1e4, -1e4]]])  # log 3 = 1.0986123
    # uniform over 4: log 4 = 1.386294; p = (1/4, 3/4, 0, 0): 0.25·log 4 + 0.75·log(4/3) = 0.346574 + 0.215762
    assert_values(token_entropy(logits), [[1.386294, 0.562335]])
    # temperature → ∞ flattens to uniform; T = 1e6 gives log 4 on the second row too (up to 1e−6)
    assert token_entropy(logits[:, 1:, :2], temperature=1e6).item() == pytest.approx(0.693147, abs=1e-6)


def test_token_entropy_chunking():
    logits, _ = random_case()
    torch.testing.assert_close(token_entropy(logits, chunk_size=2), token_entropy(logits))


def test_masked_reductions():
    values = torch.tensor([[1.0, 2.0, float("inf")], [4.0, float("nan"), float("nan")]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_sum(values, mask).item() == 7.0
    assert masked_mean(values, mask).item() == pytest.approx(7 / 3)
    assert masked_mean(values, mask, dim=1).tolist() == pytest.approx([1.5, 4.0])
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0  # empty mask: 0, not NaN
