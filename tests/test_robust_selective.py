import copy
import json
import math

import numpy as np
import pytest
import torch

from safetylab.core.errors import SafetylabError
from safetylab.core.tensors import predict_logits
from safetylab.robust.selective import (
    Criterion,
    SelectiveClassifier,
    aurc,
    clopper_pearson_upper,
    criterion_for_coverage,
    criterion_for_risk,
    excess_aurc,
    msp_score,
    optimal_aurc,
    plot_risk_coverage,
    risk_coverage,
    threshold_for_coverage,
    threshold_for_risk,
)


def brute_force_aurc(u: np.ndarray, correct: np.ndarray) -> float:
    """For each acceptance size n, set the threshold at the n-th smallest uncertainty and accept every
    input at or below it (ties together); average the risk over n = 1..N."""
    risks = []
    for t in np.sort(u):
        accepted = u <= t
        risks.append(np.mean(~correct[accepted]))
    return float(np.mean(risks))


def test_hand_worked_curve_with_ties():
    u = torch.tensor([0.5, 0.2, 0.1, 0.2])
    correct = torch.tensor([False, False, True, True])
    coverage, risk = risk_coverage(u, correct)
    assert coverage.tolist() == [0.25, 0.75, 1.0]  # the two 0.2s are accepted together: no point at 0.5
    assert risk.tolist() == pytest.approx([0.0, 1 / 3, 0.5])
    assert aurc(u, correct) == pytest.approx((0 + 2 * (1 / 3) + 0.5) / 4)


@pytest.mark.parametrize("seed", range(5))
def test_aurc_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 60
    u = rng.integers(0, 8, n).astype(float)  # many ties
    correct = rng.random(n) < 0.7
    assert aurc(torch.tensor(u), torch.tensor(correct)) == pytest.approx(brute_force_aurc(u, correct), abs=1e-12)
    coverage, risk = risk_coverage(torch.tensor(u, dtype=torch.float32), torch.tensor(correct).long())
    assert len(coverage) == len(np.unique(u)) and coverage[-1] == 1.0
    assert risk[-1].item() == pytest.approx(np.mean(~correct))


def test_aurc_without_ties_and_excess():
    rng = np.random.default_rng(7)
    u = rng.random(50)
    correct = rng.random(50) < 0.8
    ordered = correct[np.argsort(u)]
    expected = np.mean(np.cumsum(~ordered) / np.arange(1, 51))
    assert aurc(torch.tensor(u), torch.tensor(correct)) == pytest.approx(expected, abs=1e-12)
    perfect = torch.tensor(np.where(correct, 0.0, 1.0) + u * 1e-3)  # every error more doubtful than every hit
    best = brute_force_aurc(perfect.numpy(), correct)
    assert optimal_aurc(torch.tensor(correct)) == pytest.approx(best, abs=1e-12)
    assert excess_aurc(perfect, torch.tensor(correct)) == pytest.approx(0.0, abs=1e-12)
    assert excess_aurc(torch.tensor(u), torch.tensor(correct)) == pytest.approx(expected - best, abs=1e-12)


def test_threshold_for_coverage_with_ties():
    rng = np.random.default_rng(3)
    scores = torch.tensor(rng.integers(0, 20, 200).astype(np.float32))
    for target in (0.1, 0.5, 0.7, 0.9, 1.0):
        t = threshold_for_coverage(scores, target)
        assert (scores <= t).float().mean() >= target
        assert (scores < t).float().mean() < target  # the next lower threshold falls short: t is the smallest
    assert threshold_for_coverage(torch.arange(10.0), 0.7) == 6.0  # 0.7 · 10 = 7 despite rounding error
    assert threshold_for_coverage(scores, 0.0) == -math.inf


def test_threshold_for_risk_empirical_and_bounded():
    # 100 inputs in order of doubt: the 60 least doubtful right, the other 40 wrong.
    scores = torch.arange(100.0)
    correct = scores < 60
    # Empirical: n accepted have n - 60 errors; (n - 60) / n <= 0.05 up to n = 63.
    assert threshold_for_risk(scores, correct, 0.05) == 62.0
    # Bound at 90 %: with no error among n, Clopper–Pearson gives 1 − 0.1^(1/n) (0.0376 at n = 60);
    # one error among 61 already bounds the risk above 0.05.
    assert clopper_pearson_upper(0, 60, 0.1) == pytest.approx(1 - 0.1 ** (1 / 60))
    assert clopper_pearson_upper(1, 61, 0.1) > 0.05
    assert threshold_for_risk(scores, correct, 0.05, delta=0.1) == 59.0
    # Unreachable: the first input is already wrong and nothing reaches zero risk -> abstain on everything.
    assert threshold_for_risk(scores, ~correct, 0.0) == -math.inf
    assert threshold_for_risk(scores, correct, 0.0, delta=0.5) == -math.inf  # bound > 0 with finite n


@pytest.mark.parametrize("seed", range(3))
def test_threshold_for_risk_is_the_largest_coverage_meeting_the_target(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 30, 300).astype(float)
    correct = rng.random(300) < 1 - scores / 60  # errors grow with doubt
    for target in (0.05, 0.1, 0.2):
        t = threshold_for_risk(torch.tensor(scores), torch.tensor(correct), target)
        best = max((np.mean(scores <= s) for s in np.unique(scores) if np.mean(~correct[scores <= s]) <= target),
                   default=0.0)
        assert np.mean(scores <= t) == best
        if best > 0:
            assert np.mean(~correct[scores <= t]) <= target


def ink(x: torch.Tensor) -> torch.Tensor:
    """Mean pixel intensity: a stand-in for an OOD detector's score."""
    return x.flatten(1).mean(1)


@pytest.fixture(scope="module")
def val_scores(digits, digits_model):
    return msp_score(digits_model)(digits.x_val)


def test_msp_criteria_meet_their_targets_on_validation(digits, digits_model, val_scores):
    probs = predict_logits(digits_model, digits.x_val).softmax(1)
    assert torch.allclose(val_scores, -probs.max(1).values)
    by_coverage = criterion_for_coverage("msp", msp_score(digits_model), digits.x_val, 0.9)
    out = SelectiveClassifier(digits_model, [by_coverage]).predict(digits.x_val)
    assert out.coverage >= 0.9
    assert out.coverage == pytest.approx((val_scores <= by_coverage.threshold).double().mean().item())
    by_risk = criterion_for_risk("msp", msp_score(digits_model), digits_model, digits.x_val, digits.y_val, 0.005)
    out = SelectiveClassifier(digits_model, [by_risk]).predict(digits.x_val)
    wrong = (out.labels != digits.y_val) & ~out.abstained
    assert wrong.sum() <= 0.005 * (~out.abstained).sum() and 0 < out.coverage < 1


def test_abstentions_name_every_criterion_that_fired(digits, digits_model, val_scores):
    x = digits.x_val[:40]
    msp = Criterion("msp", msp_score(digits_model), threshold_for_coverage(val_scores[:40], 0.8))
    heavy = Criterion("ink", ink, torch.quantile(ink(x), 0.7).item())
    out = SelectiveClassifier(digits_model, [msp, heavy]).predict(x)
    fired_msp = val_scores[:40] > msp.threshold
    fired_ink = ink(x) > heavy.threshold
    assert torch.equal(out.abstained, fired_msp | fired_ink) and fired_msp.any() and fired_ink.any()
    assert torch.equal(out.labels[out.abstained], torch.full((int(out.abstained.sum()),), -1))
    assert torch.equal(out.labels[~out.abstained], out.probs.argmax(1)[~out.abstained])
    for i, reason in enumerate(out.reasons):
        assert (reason is None) == (not out.abstained[i])
        assert ("msp score" in (reason or "")) == bool(fired_msp[i])
        assert ("ink score" in (reason or "")) == bool(fired_ink[i])
    i = int((fired_msp & ~fired_ink).nonzero()[0])
    assert out.reasons[i] == f"msp score {val_scores[i].item():.4g} > threshold {msp.threshold:.4g}"
    records = out.abstentions()
    assert len(records) == int(fired_msp.sum() + fired_ink.sum())
    expected = {(j, "msp") for j in fired_msp.nonzero()[:, 0].tolist()}
    expected |= {(j, "ink") for j in fired_ink.nonzero()[:, 0].tolist()}
    assert {(r.index, r.criterion) for r in records} == expected
    assert all(r.score > r.threshold for r in records)
    json.dumps([r.to_dict() for r in records], allow_nan=False)


def test_a_criterion_that_abstains_on_everything_is_json_friendly(digits, digits_model):
    never = Criterion("never", msp_score(digits_model), -math.inf)
    out = SelectiveClassifier(digits_model, [never]).predict(digits.x_val[:5])
    assert out.abstained.all() and out.coverage == 0.0
    assert json.loads(json.dumps(out.abstentions()[0].to_dict(), allow_nan=False))["threshold"] is None


def test_bad_input(digits, digits_model):
    u, correct = torch.tensor([0.1, 0.2]), torch.tensor([True, False])
    with pytest.raises(SafetylabError, match="uncertainty must be a 1-D tensor"):
        aurc(torch.zeros(2, 2), correct)
    with pytest.raises(SafetylabError, match="uncertainty is empty"):
        risk_coverage(torch.tensor([]), torch.tensor([], dtype=torch.bool))
    with pytest.raises(SafetylabError, match="NaN"):
        aurc(torch.tensor([0.1, math.nan]), correct)
    with pytest.raises(SafetylabError, match="correct must be a 1-D tensor of 2 booleans"):
        aurc(u, torch.tensor([True]))
    with pytest.raises(SafetylabError, match="correct must hold booleans"):
        aurc(u, torch.tensor([0, 2]))
    with pytest.raises(SafetylabError, match="coverage must be a number in"):
        threshold_for_coverage(u, 1.5)
    with pytest.raises(SafetylabError, match="delta"):
        threshold_for_risk(u, correct, 0.1, delta=0.0)
    with pytest.raises(SafetylabError, match="distinct names"):
        SelectiveClassifier(digits_model, [Criterion("a", msp_score(digits_model), 0.0)] * 2)
    with pytest.raises(SafetylabError, match="threshold must be a number"):
        Criterion("a", msp_score(digits_model), math.nan)
    wrong_shape = Criterion("bad", lambda x: torch.zeros(len(x), 2), 0.0)
    with pytest.raises(SafetylabError, match="criterion 'bad' score must be a 1-D tensor"):
        SelectiveClassifier(digits_model, [wrong_shape]).predict(digits.x_val[:4])
    training = copy.deepcopy(digits_model).train()
    with pytest.raises(SafetylabError, match="training mode"):
        SelectiveClassifier(training, [Criterion("a", ink, 0.0)]).predict(digits.x_val)


def test_plot_risk_coverage_writes_a_png(tmp_path):
    u, correct = torch.tensor([0.5, 0.2, 0.1, 0.2]), torch.tensor([False, False, True, True])
    path = plot_risk_coverage({"msp": risk_coverage(u, correct), "random": risk_coverage(-u, correct)},
                              tmp_path / "rc.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["rc.png"]
    with pytest.raises(SafetylabError, match=r"curves\['x'\]"):
        plot_risk_coverage({"x": (u, correct[:2])}, tmp_path / "bad.png")
