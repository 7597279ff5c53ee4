"""Pair statistics of a reward model, against numbers worked out by hand."""

from __future__ import annotations

import pytest

from prefalign.evaluation.pairs import pair_metrics, pearson, roc_auc, wilson_interval


def test_wilson_interval_pearson_and_auc_by_hand():
    # 60 of 100: centre (0.6 + z²/200) / (1 + z²/100) = 0.596300, half-width 0.094298
    low, high = wilson_interval(60, 100)
    assert (low, high) == pytest.approx((0.502002, 0.690598), abs=1e-6)
    # cov 5, var_x 2, var_y 12.666667: 5 / sqrt(25.333333) = 0.993399
    assert pearson([1.0, 2.0, 3.0], [2.0, 4.0, 7.0]) == pytest.approx(0.993399, abs=1e-6)
    assert pearson([1.0, 2.0], [3.0, 3.0]) is None
    # positives 0.9, 0.3 vs negatives 0.8, 0.3: win, win, loss, tie → 2.5 / 4
    assert roc_auc([0.9, 0.8, 0.3, 0.3], [True, False, True, False]) == pytest.approx(0.625)
    metrics = pair_metrics([2.0, 0.0], [1.0, 1.0], [3, 1], [2, 2])
    assert metrics["accuracy"] == 0.5 and metrics["margin"] == pytest.approx(0.0)
    # rewards [2, 0, 1, 1] vs lengths [3, 1, 2, 2]: perfectly correlated
    assert metrics["length_correlation"] == pytest.approx(1.0)
