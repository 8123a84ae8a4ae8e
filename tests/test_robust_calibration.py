import math

import numpy as np
import pytest
import torch

from safetylab.core.errors import SafetylabError
from safetylab.core.tensors import predict_logits
from safetylab.robust.calibration import (
    ReliabilityBins,
    TemperatureScaled,
    brier_score,
    calibration_metrics,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    plot_reliability,
    reliability_bins,
)

# Six predictions over 3 classes and 5 bins (0, .2], (.2, .4], (.4, .6], (.6, .8], (.8, 1]:
# confidence 0.4, 0.6 and 0.8 sit exactly on edges (they go to the bin on their left), 1.0 to the last bin.
HAND_PROBS = [[0.40, 0.35, 0.25],  # conf .40 -> bin 1, predicts 0, label 0: right
              [0.35, 0.33, 0.32],  # conf .35 -> bin 1, predicts 0, label 1: wrong
              [0.10, 0.90, 0.00],  # conf .90 -> bin 4, predicts 1, label 1: right
              [0.00, 0.00, 1.00],  # conf 1.0 -> bin 4, predicts 2, label 0: wrong
              [0.60, 0.40, 0.00],  # conf .60 -> bin 2, predicts 0, label 0: right
              [0.20, 0.80, 0.00]]  # conf .80 -> bin 3, predicts 1, label 0: wrong
HAND_LABELS = [0, 1, 1, 0, 0, 0]
# bin 1: acc 1/2, conf .375 ; bin 2: acc 1, conf .6 ; bin 3: acc 0, conf .8 ; bin 4: acc 1/2, conf .95
HAND_ECE = (2 * 0.125 + 1 * 0.4 + 1 * 0.8 + 2 * 0.45) / 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hand_worked_ece_and_bins(dtype):
    probs, labels = torch.tensor(HAND_PROBS, dtype=dtype), torch.tensor(HAND_LABELS)
    bins = reliability_bins(probs, labels, n_bins=5)
    assert bins.count.tolist() == [0, 2, 1, 1, 2]
    assert torch.allclose(bins.edges, torch.tensor([0, 0.2, 0.4, 0.6, 0.8, 1.0], dtype=torch.float64))
    assert math.isnan(bins.accuracy[0]) and math.isnan(bins.confidence[0])
    assert np.allclose(bins.accuracy[1:].numpy(), [0.5, 1.0, 0.0, 0.5])
    assert np.allclose(bins.confidence[1:].numpy(), [0.375, 0.6, 0.8, 0.95], atol=1e-7)
    assert expected_calibration_error(probs, labels, n_bins=5) == pytest.approx(HAND_ECE, abs=1e-7)


def numpy_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    """Guo et al.'s loop: bins lower < conf <= upper, plus conf == 0 in the first."""
    conf, pred = probs.max(1), probs.argmax(1)
    total = 0.0
    for m in range(n_bins):
        lower, upper = m / n_bins, (m + 1) / n_bins
        inside = (conf > lower) & (conf <= upper) | ((m == 0) & (conf == 0))
        if inside.any():
            total += inside.mean() * abs((pred[inside] == labels[inside]).mean() - conf[inside].mean())
    return total


@pytest.mark.parametrize("n_bins", [1, 7, 15])
def test_ece_matches_numpy_loop(n_bins):
    gen = torch.Generator().manual_seed(n_bins)
    probs = torch.softmax(3 * torch.randn(500, 6, generator=gen, dtype=torch.float64), 1)
    probs[:20] = torch.nn.functional.one_hot(torch.arange(20) % 6, 6).double()  # confidence exactly 1.0
    labels = torch.randint(0, 6, (500,), generator=gen)
    labels[:10] = torch.arange(10) % 6  # half of the certain ones right
    expected = numpy_ece(probs.numpy(), labels.numpy(), n_bins)
    assert expected_calibration_error(probs, labels, n_bins) == pytest.approx(expected, abs=1e-12)
    assert reliability_bins(probs, labels, n_bins).count.sum() == 500


def test_nll_and_brier_against_numpy_and_sklearn():
    from sklearn.metrics import accuracy_score, brier_score_loss, log_loss

    gen = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(300, 4, generator=gen, dtype=torch.float64), 1)
    labels = torch.randint(0, 4, (300,), generator=gen)
    p, y = probs.numpy(), labels.numpy()
    nll = -np.mean(np.log(p[np.arange(300), y]))
    brier = np.mean(np.sum((p - np.eye(4)[y]) ** 2, axis=1))
    assert negative_log_likelihood(probs, labels) == pytest.approx(nll, rel=1e-12)
    assert negative_log_likelihood(probs, labels) == pytest.approx(log_loss(y, p, labels=range(4)), rel=1e-9)
    assert brier_score(probs, labels) == pytest.approx(brier, rel=1e-12)
    assert brier_score(probs, labels) == pytest.approx(brier_score_loss(y, p, labels=range(4)), rel=1e-9)
    metrics = calibration_metrics(probs, labels, n_bins=10)
    assert metrics == pytest.approx({"accuracy": accuracy_score(y, p.argmax(1)), "nll": nll, "brier": brier,
                                     "ece": numpy_ece(p, y, 10)})


def test_brier_is_the_class_sum_and_nll_is_clamped():
    probs, labels = torch.tensor([[0.0, 1.0], [0.75, 0.25]]), torch.tensor([0, 0])
    # (0-1)² + (1-0)² = 2 for the first, (0.75-1)² + 0.25² = 0.125 for the second: not divided by C = 2.
    assert brier_score(probs, labels) == pytest.approx((2 + 0.125) / 2)
    assert negative_log_likelihood(probs, labels) == pytest.approx((-math.log(1e-12) - math.log(0.75)) / 2)


def test_temperature_recovers_a_known_temperature():
    gen = torch.Generator().manual_seed(0)
    base = 2 * torch.randn(10000, 5, generator=gen)
    labels = torch.multinomial(torch.softmax(base, 1), 1, generator=gen)[:, 0]
    logits = 3 * base  # over-confident by a factor 3
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(3.0, rel=0.05)
    # It is the minimiser of the NLL, found independently by a bounded scalar search.
    from scipy.optimize import minimize_scalar

    z, y = logits.double().numpy(), labels.numpy()

    def nll(temp):
        s = z / temp
        s = s - s.max(1, keepdims=True)
        return np.mean(np.log(np.exp(s).sum(1)) - s[np.arange(len(y)), y])

    best = minimize_scalar(nll, bounds=(0.5, 10.0), method="bounded", options={"xatol": 1e-8}).x
    assert t == pytest.approx(best, abs=1e-4)


def test_temperature_scaling_on_digits(digits, digits_model):
    logits = predict_logits(digits_model, digits.x_val)
    t = fit_temperature(logits, digits.y_val)
    scaled = TemperatureScaled(digits_model, t)
    assert not scaled.training and scaled.temperature.item() == pytest.approx(t)
    after = predict_logits(scaled, digits.x_val)
    assert torch.equal(after.argmax(1), logits.argmax(1))
    assert torch.allclose(after, logits / t, atol=1e-5)
    before_nll = negative_log_likelihood(logits.softmax(1), digits.y_val)
    after_nll = negative_log_likelihood(after.softmax(1), digits.y_val)
    assert t != pytest.approx(1.0, abs=1e-3) and after_nll < before_nll
    assert "temperature" in scaled.state_dict()


def test_temperature_scaling_keeps_a_float64_models_precision():
    """T is held in the model's dtype (a float32 buffer rounded T = 1.3 to 1.2999999523)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double().eval()
    scaled = TemperatureScaled(model, 1.3)
    x = torch.randn(5, 4, dtype=torch.float64)
    assert scaled.temperature.dtype == torch.float64 and scaled.temperature.item() == 1.3
    torch.testing.assert_close(scaled(x), model(x) / 1.3, rtol=0, atol=0)


def test_plot_reliability_writes_a_png(tmp_path):
    probs, labels = torch.tensor(HAND_PROBS), torch.tensor(HAND_LABELS)
    sharp = torch.softmax(5 * probs.log().clamp(min=-20), 1)
    path = plot_reliability({"raw": reliability_bins(probs, labels, 5), "sharp": reliability_bins(sharp, labels, 5)},
                            tmp_path / "plots" / "reliability.png", title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["reliability.png"]  # no temporary file left
    with pytest.raises(SafetylabError, match="bins_by_name"):
        plot_reliability({}, tmp_path / "empty.png")


@pytest.mark.parametrize("probs, labels, match", [
    (torch.tensor([0.2, 0.8]), torch.tensor([1]), "probs must have shape"),
    (torch.empty(0, 3), torch.empty(0, dtype=torch.long), "probs is empty"),
    (torch.tensor([[0.5, 0.6]]), torch.tensor([0]), "sum to 1"),
    (torch.tensor([[0.5, 0.5]]), torch.tensor([2]), r"labels must hold class indices in \[0, 1\]"),
    (torch.tensor([[0.5, 0.5]]), torch.tensor([0, 1]), "labels has 2 labels for 1 inputs"),
    (torch.tensor([[0.5, 0.5]]), torch.tensor([0.0]), "labels must be a 1-D integer tensor"),
    ([[0.5, 0.5]], torch.tensor([0]), "probs must be a tensor"),
])
def test_bad_input(probs, labels, match):
    for metric in (expected_calibration_error, negative_log_likelihood, brier_score, calibration_metrics):
        with pytest.raises(SafetylabError, match=match):
            metric(probs, labels)


def test_bad_arguments():
    probs, labels = torch.tensor(HAND_PROBS), torch.tensor(HAND_LABELS)
    with pytest.raises(SafetylabError, match="n_bins"):
        reliability_bins(probs, labels, n_bins=0)
    with pytest.raises(SafetylabError, match="logits must have shape"):
        fit_temperature(torch.randn(5), labels)
    with pytest.raises(SafetylabError, match="NaN"):
        fit_temperature(torch.tensor([[0.0, math.nan]]), torch.tensor([0]))
    with pytest.raises(SafetylabError, match="labels"):
        fit_temperature(torch.randn(6, 3), torch.tensor([0, 1, 2, 3, 0, 0]))
    with pytest.raises(SafetylabError, match="temperature"):
        TemperatureScaled(torch.nn.Linear(2, 2), 0.0)
    assert isinstance(reliability_bins(probs, labels), ReliabilityBins)
