"""Randomized smoothing: counts and radii against the closed form of a linear classifier, the certified
radius a lower bound that tightens with n, abstention on ties, Clopper–Pearson against SciPy, and bad
input."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch
from scipy.stats import binomtest
from torch import nn

from safetylab.core.errors import SafetylabError
from safetylab.verify.smoothing import (
    SmoothedClassifier,
    certified_accuracy_at,
    certified_radius,
    clopper_pearson_lower,
)

PHI = NormalDist()


class HalfPlane(nn.Module):
    """Class 0 where w·x > 0, class 1 elsewhere (logits (w·x, 0)). Under noise N(0, σ²I),
    P(class 0) = Φ(w·x / (σ‖w‖)), and the distance to the boundary is |w·x| / ‖w‖."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float32), requires_grad=False)

    def forward(self, x):
        s = x @ self.w
        return torch.stack([s, torch.zeros_like(s)], 1)


class Constant(nn.Module):
    """Always class k of `classes`, whatever the input."""

    def __init__(self, k, classes=3):
        super().__init__()
        self.k, self.classes = k, classes

    def forward(self, x):
        logits = torch.zeros(len(x), self.classes)
        logits[:, self.k] = 1.0
        return logits


class Quadrants(nn.Module):
    """Three classes: 0 where x[0] > 0, 2 elsewhere; class 1 is never predicted."""

    def forward(self, x):
        s = x[:, 0]
        return torch.stack([s, torch.full_like(s, -1e9), -s], 1)


def seeded(seed):
    return torch.Generator().manual_seed(seed)


W = [3.0, 4.0]  # ‖w‖ = 5


def point_at(distance):
    """The input x whose signed distance w·x / ‖w‖ to the boundary of HalfPlane(W) is `distance`."""
    return torch.tensor(W) / 5 * distance


# ----------------------------------------------------------------------------- closed-form checks
def test_sample_counts_match_the_closed_form_probability():
    sigma, x = 0.5, torch.tensor([0.2, 0.1])  # w·x = 1
    counts = SmoothedClassifier(HalfPlane(W).eval(), sigma, batch_size=4096).sample_counts(x, 20_000, seeded(0))
    assert counts.dtype == torch.long and counts.shape == (2,) and counts.sum() == 20_000
    p0 = PHI.cdf(1.0 / (sigma * 5))  # Φ(0.4) = 0.655
    assert counts[0] / 20_000 == pytest.approx(p0, abs=4 * math.sqrt(p0 * (1 - p0) / 20_000))


@pytest.mark.parametrize("x_dtype, model_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float64),
                                                  (torch.int64, torch.float64), (torch.float16, torch.float32)])
def test_inputs_and_models_of_different_dtypes(x_dtype, model_dtype):
    """The noise is drawn and added in the wider of the two dtypes and the noisy copies reach the model in
    its own: the base classifier is the model after that cast, and the certificate (Cohen et al.'s
    theorem holds for any base classifier) is for the smoothed version of it. The counts follow the
    closed form, P(class 0) = Φ(w·x / (σ‖w‖))."""
    sigma, x = 0.5, torch.tensor([1.0, 0.0])  # w·x = 3: Φ(1.2)
    model = HalfPlane(W).to(model_dtype).eval()
    counts = SmoothedClassifier(model, sigma, batch_size=4096).sample_counts(x.to(x_dtype), 20_000, seeded(0))
    assert counts.sum() == 20_000
    assert counts[0].item() / 20_000 == pytest.approx(PHI.cdf(3 / (sigma * 5)), abs=0.01)
    batch = torch.stack([x, -x]).to(x_dtype)
    cert = SmoothedClassifier(model, sigma).certify_batch(batch, torch.tensor([0, 1]), n0=50, n=2000,
                                                          generator=seeded(1))
    assert cert.prediction.tolist() == [0, 1] and cert.correct.all() and (cert.radius > 0).all()


def test_certified_radius_is_a_lower_bound_that_tightens_with_n():
    sigma = 0.5
    true_radius = sigma * PHI.inv_cdf(0.9)  # p_A = 0.9 exactly; the smoothed classifier's radius
    x = point_at(true_radius)  # ...which equals the distance to the boundary
    smoothed = SmoothedClassifier(HalfPlane(W).eval(), sigma, batch_size=100_000)
    gaps = []
    for n in (100, 10_000, 1_000_000):
        cls, radius = smoothed.certify(x, n0=100, n=n, generator=seeded(n))
        assert cls == 0
        assert 0 < radius <= true_radius
        gaps.append(true_radius - radius)
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 0.01  # about σ · 3.1 · sqrt(0.09 / n) / φ(1.28) = 0.003 at n = 10⁶


@pytest.mark.parametrize("seed", range(3))
def test_certified_radius_never_exceeds_the_distance_to_the_boundary(seed):
    smoothed = SmoothedClassifier(HalfPlane(W).eval(), sigma=0.4)
    rng = torch.Generator().manual_seed(100 + seed)
    for distance in (torch.rand(8, generator=rng) * 3 - 1.5).tolist():
        cls, radius = smoothed.certify(point_at(distance), n0=50, n=2000, generator=seeded(seed))
        assert radius <= abs(distance)
        if cls != -1:  # a certified class is the side of the boundary x lies on
            assert cls == (0 if distance > 0 else 1) and radius > 0
        else:
            assert radius == 0.0


def test_certify_follows_the_counts():
    """CERTIFY's radius, recomputed from the same noise with an independent bound and Φ⁻¹."""
    sigma, x, alpha = 0.3, point_at(0.2), 0.01
    smoothed = SmoothedClassifier(HalfPlane(W).eval(), sigma, batch_size=256)
    g = seeded(5)
    guess = int(smoothed.sample_counts(x, 30, g).argmax())
    n_a = int(smoothed.sample_counts(x, 1000, g)[guess])
    p_lower = binomtest(n_a, 1000).proportion_ci(confidence_level=1 - 2 * alpha, method="exact").low
    assert smoothed.certify(x, n0=30, n=1000, alpha=alpha, generator=seeded(5)) == pytest.approx(
        (guess, sigma * PHI.inv_cdf(p_lower)), rel=1e-9)


# ----------------------------------------------------------------------------- hand-worked numbers
def test_predict_and_certify_on_a_constant_model_by_hand():
    smoothed = SmoothedClassifier(Constant(2).eval(), sigma=1.0)
    x = torch.zeros(4)
    # all n samples vote for class 2, none for the runner-up: p-value 2 · 0.5ⁿ
    assert smoothed.predict(x, 10, alpha=0.001) == -1  # 2 / 1024 = 0.00195 > 0.001
    assert smoothed.predict(x, 11, alpha=0.001) == 2  # 2 / 2048 = 0.00098 <= 0.001
    # n_A = n: the Clopper–Pearson lower bound is α^(1/n)
    cls, radius = smoothed.certify(x, n0=10, n=100, alpha=0.001)
    assert cls == 2
    assert radius == pytest.approx(PHI.inv_cdf(0.001 ** (1 / 100)), rel=1e-9)  # Φ⁻¹(0.9333) = 1.50


def test_predict_abstains_on_a_tie():
    x = torch.tensor([0.0, 0.3])
    three = SmoothedClassifier(Quadrants().eval(), sigma=0.5, abstain=-7)  # classes 0 and 2 tie at x[0] = 0
    two = SmoothedClassifier(HalfPlane(W).eval(), sigma=0.5)
    on_boundary = torch.tensor([0.4, -0.3])  # w·x = 0
    for seed in range(4):
        assert three.predict(x, 4000, generator=seeded(seed)) == -7
        assert two.predict(on_boundary, 4000, generator=seeded(seed)) == -1
        assert two.certify(on_boundary, n=4000, generator=seeded(seed)) == (-1, 0.0)
    assert three.predict(x + torch.tensor([2.0, 0.0]), 4000, generator=seeded(0)) == 0  # 4σ away: decided
    assert three.predict(x - torch.tensor([2.0, 0.0]), 4000, generator=seeded(0)) == 2


@pytest.mark.parametrize("k, n, alpha", [(1, 10, 0.05), (7, 10, 0.001), (10, 10, 0.01), (530, 1000, 0.001),
                                         (99_990, 100_000, 0.001), (3, 5, 0.3)])
def test_clopper_pearson_matches_the_exact_interval(k, n, alpha):
    # the one-sided (1 − α) bound is the low end of the two-sided (1 − 2α) exact interval
    exact = binomtest(k, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact").low
    assert clopper_pearson_lower(k, n, alpha) == pytest.approx(exact, rel=1e-10)
    assert clopper_pearson_lower(k, n, alpha) < k / n


def test_clopper_pearson_edges_and_radius():
    assert clopper_pearson_lower(0, 50, 0.001) == 0.0
    assert clopper_pearson_lower(20, 20, 0.01) == pytest.approx(0.01 ** (1 / 20))
    assert certified_radius(PHI.cdf(1.0), 0.25) == pytest.approx(0.25)
    assert certified_radius(0.99, 2.0) == pytest.approx(2 * 2.3263479, rel=1e-6)


def test_certified_accuracy_by_hand():
    radii = torch.tensor([0.0, 0.5, 1.0, 0.3])
    correct = torch.tensor([True, True, False, True])  # the first is an abstention: not certified
    assert certified_accuracy_at(radii, correct, [0.0, 0.3, 0.5, 1.0]).tolist() == [0.5, 0.5, 0.25, 0.0]
    acc = certified_accuracy_at(radii, torch.tensor([0, 1, 1, 1]), torch.tensor([0.4, 1.0]))
    assert acc.dtype == torch.float64 and acc.tolist() == [0.5, 0.25]


# ----------------------------------------------------------------------------- reproducibility
def test_same_generator_seed_same_answers():
    smoothed = SmoothedClassifier(HalfPlane(W).eval(), sigma=1.0, batch_size=300)
    x = point_at(0.1)
    first = smoothed.sample_counts(x, 1000, seeded(1))
    assert torch.equal(first, smoothed.sample_counts(x, 1000, seeded(1)))
    assert not torch.equal(first, smoothed.sample_counts(x, 1000, seeded(2)))
    assert smoothed.certify(x, n=2000, generator=seeded(3)) == smoothed.certify(x, n=2000, generator=seeded(3))
    torch.manual_seed(4)
    global_first = smoothed.sample_counts(x, 1000)
    torch.manual_seed(4)
    assert torch.equal(global_first, smoothed.sample_counts(x, 1000))


# ----------------------------------------------------------------------------- a real classifier
def test_certify_batch_on_digits(digits, digits_model):
    before = {k: v.clone() for k, v in digits_model.state_dict().items()}
    smoothed = SmoothedClassifier(digits_model, sigma=0.25, batch_size=500)
    x, y = digits.x_test[:6], digits.y_test[:6]
    cert = smoothed.certify_batch(x, y, n0=20, n=300, generator=seeded(0))
    assert cert.prediction.shape == cert.radius.shape == cert.correct.shape == (6,)
    abstained = cert.prediction == -1
    assert (cert.radius[abstained] == 0).all() and not cert.correct[abstained].any()
    assert torch.equal(cert.correct, cert.prediction == y)
    assert (cert.radius[~abstained] > 0).all()
    assert (cert.radius <= 0.25 * PHI.inv_cdf(0.001 ** (1 / 300)) + 1e-9).all()  # the radius when n_A = n
    assert cert.correct.sum() >= 4  # most clean test digits stay correct under this noise
    g = seeded(0)  # the batch is a loop of certify calls drawing from one generator
    one_by_one = [smoothed.certify(xi, n0=20, n=300, generator=g) for xi in x]
    assert cert.prediction.tolist() == [c for c, _ in one_by_one]
    assert cert.radius.tolist() == pytest.approx([r for _, r in one_by_one])
    assert certified_accuracy_at(cert.radius, cert.correct, [0.0]).item() == pytest.approx(cert.correct.double().mean())
    assert smoothed.certify_batch(x[:2], n0=5, n=20).correct is None
    assert all(torch.equal(v, before[k]) for k, v in digits_model.state_dict().items())


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, match", [
    ({"sigma": 0.0}, "sigma"), ({"sigma": -0.5}, "sigma"), ({"sigma": float("nan")}, "sigma"),
    ({"sigma": float("inf")}, "sigma"), ({"sigma": 0.5, "batch_size": 0}, "batch_size"),
    ({"sigma": 0.5, "num_classes": 1}, "num_classes"), ({"sigma": 0.5, "abstain": 0}, "abstain"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(SafetylabError, match=match):
        SmoothedClassifier(HalfPlane(W).eval(), **kwargs)


@pytest.mark.parametrize("call, match", [
    (lambda s, x: s.sample_counts(x, 0), "n must be an integer >= 1"),
    (lambda s, x: s.predict(x, 0), "n must be an integer >= 1"),
    (lambda s, x: s.predict(x, 10, alpha=0.0), "alpha"),
    (lambda s, x: s.certify(x, n0=0), "n0 must be an integer >= 1"),
    (lambda s, x: s.certify(x, n=0), "n must be an integer >= 1"),
    (lambda s, x: s.certify(x, n=2.5), "n must be an integer >= 1"),
    (lambda s, x: s.certify(x, alpha=1.0), "alpha"),
    (lambda s, x: s.certify(x, alpha=-0.1), "alpha"),
    (lambda s, x: s.sample_counts(torch.empty(0), 10), "non-empty"),
    (lambda s, x: s.sample_counts(torch.tensor([float("nan"), 0.0]), 10), "finite"),
    (lambda s, x: s.sample_counts(torch.zeros(3, 2), 10), r"ONE input.*\(3, 2\)"),
    (lambda s, x: s.certify_batch(torch.zeros(3, 2), torch.tensor([0, 1])), "labels has 2 labels for 3"),
    (lambda s, x: s.certify_batch(torch.zeros(2, 2), torch.tensor([0, 2])), r"class indices in \[0, 1"),
])
def test_bad_call_arguments(call, match):
    with pytest.raises(SafetylabError, match=match):
        call(SmoothedClassifier(HalfPlane(W).eval(), sigma=0.5), torch.zeros(2))


def test_a_batch_where_one_image_is_expected(digits, digits_model):
    smoothed = SmoothedClassifier(digits_model, sigma=0.25)
    with pytest.raises(SafetylabError, match=r"ONE input.*\(2, 1, 8, 8\)"):
        smoothed.certify(digits.x_test[:2], n0=5, n=10)
    assert smoothed.sample_counts(digits.x_test[0], 10).sum() == 10  # one image (1, 8, 8) is fine


def test_training_mode_and_class_count_are_refused():
    model = HalfPlane(W).train()
    with pytest.raises(SafetylabError, match="training mode"):
        SmoothedClassifier(model, sigma=0.5)
    smoothed = SmoothedClassifier(model.eval(), sigma=0.5)
    model.train()
    with pytest.raises(SafetylabError, match="training mode"):
        smoothed.certify(torch.zeros(2), n=10)
    with pytest.raises(SafetylabError, match="num_classes is 3 but the model returns 2"):
        SmoothedClassifier(model.eval(), sigma=0.5, num_classes=3).predict(torch.zeros(2), 10)


@pytest.mark.parametrize("radii, correct, thresholds, match", [
    (torch.zeros(2, 2), torch.ones(2, dtype=torch.bool), [0.0], "radii"),
    (torch.tensor([-0.1, 0.2]), torch.ones(2, dtype=torch.bool), [0.0], "radii must be >= 0"),
    (torch.tensor([0.1, 0.2]), torch.ones(3, dtype=torch.bool), [0.0], "correct must be a 1-D tensor of 2"),
    (torch.tensor([0.1, 0.2]), torch.tensor([0.5, 1.0]), [0.0], "booleans"),
    (torch.tensor([0.1, 0.2]), torch.ones(2, dtype=torch.bool), [-1.0], "thresholds"),
    (torch.tensor([0.1, 0.2]), torch.ones(2, dtype=torch.bool), [], "thresholds"),
])
def test_bad_certified_accuracy_arguments(radii, correct, thresholds, match):
    with pytest.raises(SafetylabError, match=match):
        certified_accuracy_at(radii, correct, thresholds)
