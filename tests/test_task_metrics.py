"""Task metrics against hand-computed values and independent textbook formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainer.data.task_metrics import (
    PRIMARY_METRIC,
    accuracy,
    compute_metrics,
    f1,
    matthews_corrcoef,
    pearson,
    primary_metric,
    rankdata,
    spearman,
)
from trainer.data.tasks import builtin_task


def confusion(tp: int, tn: int, fp: int, fn: int) -> tuple[list[int], list[int]]:
    """(predictions, labels) with the given binary confusion counts."""
    preds = [1] * tp + [0] * tn + [1] * fp + [0] * fn
    labels = [1] * tp + [0] * tn + [0] * fp + [1] * fn
    return preds, labels


def mcc_binary_formula(tp: int, tn: int, fp: int, fn: int) -> float:
    den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / den if den else 0.0


def mcc_onehot_covariance(pred, true) -> float:
    """Gorodkin's R_K written as cov(X, Y) / sqrt(cov(X, X) cov(Y, Y)) over one-hot matrices."""
    classes = sorted(set(pred) | set(true))
    x = np.array([[t == c for c in classes] for t in true], dtype=float)
    y = np.array([[p == c for c in classes] for p in pred], dtype=float)
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    cxy, cxx, cyy = (x * y).sum(), (x * x).sum(), (y * y).sum()
    return cxy / math.sqrt(cxx * cyy) if cxx and cyy else 0.0


def average_ranks_loop(values) -> list[float]:
    """Average ranks by brute force: rank = (#smaller) + (#equal + 1) / 2."""
    return [sum(w < v for w in values) + (sum(w == v for w in values) + 1) / 2 for v in values]


def test_accuracy():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert accuracy(np.array([2, 2]), [2, 2]) == 1.0
    with pytest.raises(ValueError, match="3 predictions but 2 labels"):
        accuracy([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="no predictions"):
        accuracy([], [])


def test_f1_known_values_and_edge_cases():
    preds, labels = confusion(tp=2, tn=5, fp=1, fn=1)
    assert f1(preds, labels) == pytest.approx(2 / 3)  # P = R = 2/3
    preds, labels = confusion(tp=3, tn=1, fp=3, fn=0)
    assert f1(preds, labels) == pytest.approx(2 * 0.5 * 1.0 / 1.5)  # P = 1/2, R = 1
    assert f1([0, 0, 0], [0, 0, 0]) == 0.0  # no positives anywhere: undefined -> 0 (sklearn zero_division)
    assert f1([0, 0], [1, 1]) == 0.0  # nothing predicted positive
    assert f1([1, 1], [0, 0]) == 0.0  # only false positives
    assert f1([1, 1, 0], [1, 1, 0]) == 1.0
    assert f1([0, 1], [0, 0], positive=0) == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "counts", [(6, 3, 1, 2), (10, 10, 0, 0), (0, 0, 4, 4), (5, 0, 3, 0), (0, 7, 0, 2), (90, 5, 4, 1)]
)
def test_mcc_binary_matches_the_confusion_matrix_formula(counts):
    preds, labels = confusion(*counts)
    assert matthews_corrcoef(preds, labels) == pytest.approx(mcc_binary_formula(*counts), abs=1e-12)


def test_mcc_known_values():
    assert matthews_corrcoef(*confusion(6, 3, 1, 2)) == pytest.approx(16 / math.sqrt(7 * 8 * 4 * 5))
    assert matthews_corrcoef([1, -1, 1, 1], [1, 1, 1, -1]) == pytest.approx(-1 / 3)  # sklearn's docstring example
    assert matthews_corrcoef([1, 0, 1], [1, 0, 1]) == 1.0
    assert matthews_corrcoef([0, 1, 0], [1, 0, 1]) == -1.0
    # 3 classes, confusion rows (true) [[1,1,0],[0,1,1],[1,0,1]]: (3*6 - 12) / sqrt((36-12)(36-12)) = 0.25
    assert matthews_corrcoef([0, 1, 1, 2, 2, 0], [0, 0, 1, 1, 2, 2]) == pytest.approx(0.25)


def test_mcc_undefined_is_zero():
    assert matthews_corrcoef([1, 1, 1, 1], [0, 1, 0, 1]) == 0.0  # a constant classifier
    assert matthews_corrcoef([0, 1, 0, 1], [1, 1, 1, 1]) == 0.0  # a single true class
    assert matthews_corrcoef([1, 1], [1, 1]) == 0.0  # sklearn gives 0.0 here too


def test_mcc_multiclass_matches_onehot_covariance_on_random_cases():
    rng = np.random.default_rng(0)
    for k in (2, 3, 5):
        for _ in range(30):
            n = int(rng.integers(1, 30))
            pred, true = rng.integers(0, k, n).tolist(), rng.integers(0, k, n).tolist()
            assert matthews_corrcoef(pred, true) == pytest.approx(mcc_onehot_covariance(pred, true), abs=1e-12)


def test_pearson_known_value_and_constant_input():
    # dx = [-2,-1,0,1,2], dy = [-2,0,1,0,1]: sum dx dy = 6, sum dx^2 = 10, sum dy^2 = 6
    assert pearson([1, 2, 3, 4, 5], [2, 4, 5, 4, 5]) == pytest.approx(6 / math.sqrt(60))
    assert pearson([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert pearson([2.0, 2.0, 2.0], [1, 2, 3]) == 0.0  # undefined
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=50), rng.normal(size=50)
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)


def test_rankdata_averages_ties():
    assert rankdata([10, 20, 20, 5, 20]).tolist() == [2.0, 4.0, 4.0, 1.0, 4.0]
    assert rankdata([3.0, 1.0, 2.0]).tolist() == [3.0, 1.0, 2.0]
    rng = np.random.default_rng(2)
    v = rng.integers(0, 4, 25).tolist()
    assert rankdata(v).tolist() == average_ranks_loop(v)


def test_spearman_with_ties():
    # ranks x = [1, 2.5, 2.5, 4], ranks y = [1, 3, 2, 4]: 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    # the no-ties shortcut 1 - 6 sum d^2 / (n (n^2 - 1)) = 0.95 would be wrong here
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) != pytest.approx(0.95)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)  # monotone, not linear
    assert spearman([5, 5, 5], [1, 2, 3]) == 0.0
    rng = np.random.default_rng(3)
    for _ in range(20):
        x, y = rng.integers(0, 5, 12).tolist(), rng.integers(0, 5, 12).tolist()
        rx, ry = average_ranks_loop(x), average_ranks_loop(y)
        expected = np.corrcoef(rx, ry)[0, 1] if np.std(rx) and np.std(ry) else 0.0
        assert spearman(x, y) == pytest.approx(expected, abs=1e-12)


def test_compute_metrics_per_task():
    preds, labels = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    for task in ("sst2", "imdb", "rte", "amazon_books", "some_custom_task", "classification"):
        assert compute_metrics(task, preds, labels) == {"accuracy": 0.6}
    mrpc = compute_metrics("mrpc", preds, labels)
    assert mrpc == pytest.approx({"accuracy": 0.6, "f1": 2 / 3, "acc_and_f1": (0.6 + 2 / 3) / 2})
    cola = compute_metrics("cola", preds, labels)
    assert cola == pytest.approx({"mcc": mcc_binary_formula(2, 1, 1, 1), "accuracy": 0.6})
    logits = [[0.1, 0.9], [0.3, 0.7], [2.0, -1.0], [0.6, 0.4], [-5.0, 5.0]]  # argmax = preds
    assert compute_metrics("cola", logits, labels) == cola
    reg = compute_metrics("stsb", [[1.0], [2.0], [3.0], [4.0], [5.0]], [2, 4, 5, 4, 5])
    assert reg["pearson"] == pytest.approx(6 / math.sqrt(60))
    assert reg["spearman"] == pytest.approx(spearman([1, 2, 3, 4, 5], [2, 4, 5, 4, 5]))
    assert reg["pearson_and_spearman"] == pytest.approx((reg["pearson"] + reg["spearman"]) / 2)
    # a TaskSpec works too: labels None means regression whatever its name
    spec = builtin_task("rte")
    assert compute_metrics(spec, preds, labels) == {"accuracy": 0.6}
    spec.name, spec.labels = "my_scores", None
    assert set(compute_metrics(spec, [0.5, 0.2, 0.9], [1.0, 0.0, 2.0])) == {
        "pearson",
        "spearman",
        "pearson_and_spearman",
    }
    assert primary_metric(spec) == "pearson"


def test_primary_metric():
    assert PRIMARY_METRIC["sst2"] == "accuracy"
    assert PRIMARY_METRIC["mrpc"] == "f1"
    assert PRIMARY_METRIC["cola"] == "mcc"
    assert PRIMARY_METRIC["stsb"] == "pearson"
    assert PRIMARY_METRIC["imdb"] == PRIMARY_METRIC["rte"] == PRIMARY_METRIC["anything_else"] == "accuracy"
    for task in ("sst2", "mrpc", "cola", "stsb", "imdb", "rte", "amazon_books"):
        reported = compute_metrics(task, [1, 0, 1], [1, 0, 0])
        assert PRIMARY_METRIC[task] in reported  # the best-checkpoint metric is always reported
        assert primary_metric(task) == PRIMARY_METRIC[task]


def test_metrics_match_sklearn_and_scipy_on_random_inputs():
    """task_metrics is hand-written (numpy only, so evaluation needs neither library): cross-check both.

    Random binary and multi-class predictions (skewed, one-class, tiny and large samples) and continuous
    and heavily tied regression values; the only intended difference is 0.0 instead of NaN where a
    correlation is undefined (constant input).
    """
    import warnings

    from scipy import stats
    from sklearn import metrics as skm

    rng = np.random.default_rng(20)
    for case in range(300):
        n = int(rng.choice([1, 2, 3, 7, 50, 1000]))
        k = int(rng.choice([2, 2, 3, 5]))
        skew = rng.dirichlet(np.ones(k) * rng.choice([0.2, 1.0, 5.0]))
        y = rng.choice(k, size=n, p=skew)
        p = np.where(rng.random(n) < rng.random(), y, rng.choice(k, size=n, p=skew))
        where = f"case {case}: n={n} k={k}"
        assert accuracy(p, y) == pytest.approx(skm.accuracy_score(y, p), abs=1e-12), where
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sklearn warns (and returns 0.0) where F1 / MCC are undefined
            assert matthews_corrcoef(p, y) == pytest.approx(skm.matthews_corrcoef(y, p), abs=1e-12), where
            if k == 2:
                expected = skm.f1_score(y, p, pos_label=1, average="binary", zero_division=0.0)
                assert f1(p, y) == pytest.approx(expected, abs=1e-12), where
    for case in range(300):
        n = int(rng.choice([2, 3, 10, 200]))
        if case % 3 == 0:  # ties: a few distinct values
            x, y = rng.integers(0, 4, n).astype(float), rng.integers(0, 3, n).astype(float)
        else:
            x = rng.normal(size=n) * 10.0 ** rng.integers(-3, 4)
            y = 0.5 * x + rng.normal(size=n)
        if case % 50 == 1:
            x[:] = 2.5  # constant: undefined correlation
        where = f"case {case}: n={n}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns (ConstantInputWarning) and returns NaN
            r, rho = stats.pearsonr(x, y).statistic, stats.spearmanr(x, y).statistic
        assert pearson(x, y) == pytest.approx(0.0 if np.isnan(r) else r, abs=1e-10), where
        assert spearman(x, y) == pytest.approx(0.0 if np.isnan(rho) else rho, abs=1e-10), where
        np.testing.assert_array_equal(rankdata(x), stats.rankdata(x, method="average"))
