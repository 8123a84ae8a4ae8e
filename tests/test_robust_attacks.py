import copy
import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from safetylab.core.errors import SafetylabError
from safetylab.core.tensors import predict_logits
from safetylab.models.classifier import ClassifierTrainConfig, Step, schedule
from safetylab.models.classifier import accuracy as classifier_accuracy
from safetylab.robust.attacks import (
    apgd,
    apgd_checkpoints,
    dlr_loss,
    fgsm,
    margin,
    pgd,
    project,
    random_start,
    square,
    square_p,
)
from safetylab.robust.evaluate import evaluate_robustness, gradient_masking, robustness_curve
from safetylab.robust.training import pgd_loss, trades_loss, train_classifier

EPS = 0.1


def linf(a, b):
    return (a - b).flatten(1).abs().amax(1)


def l2(a, b):
    return (a - b).flatten(1).norm(dim=1)


@pytest.fixture(scope="module")
def batch(digits):
    return digits.x_test[:96], digits.y_test[:96]


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


# ----------------------------------------------------------------------------- losses and geometry
def test_margin_and_dlr_by_hand():
    z = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, 0.5]])
    y = torch.tensor([0, 0])
    assert margin(z, y).tolist() == [2.0, -2.0]
    # DLR = -(z_y - max_other) / (z_pi1 - z_pi3): (3 - 1) / (3 - 0) and (0 - 2) / (2 - 0.5)
    assert torch.allclose(dlr_loss(z, y), torch.tensor([-2 / 3, 2 / 1.5]))
    # invariant to shifting and scaling the logits
    assert torch.allclose(dlr_loss(5 * z + 7, y), dlr_loss(z, y))
    with pytest.raises(SafetylabError, match="3 classes"):
        dlr_loss(z[:, :2], y)


def test_projection_keeps_ball_and_box():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(50, 1, 8, 8, generator=g)
    far = x + 3 * torch.randn(50, 1, 8, 8, generator=g)
    for norm, dist in (("linf", linf), ("l2", l2)):
        p = project(far, x, 0.3, norm)
        assert (dist(p, x) <= 0.3 + 1e-6).all() and p.min() >= 0 and p.max() <= 1
        inside = random_start(x, 0.3, norm, generator=g)
        assert (dist(inside, x) <= 0.3 + 1e-6).all() and inside.min() >= 0 and inside.max() <= 1
    near = x + 0.01 * torch.sign(torch.randn(50, 1, 8, 8, generator=g))
    near = near.clamp(0, 1)
    assert torch.equal(project(near, x, 0.3, "linf"), near)  # inside already: unchanged


def test_apgd_checkpoints_follow_the_paper():
    # p: 0.22, 0.41 (0.22 + 0.19), 0.57, 0.70, 0.80, 0.87, 0.93, 0.99, 1.05 -> w = ceil(p * 100) <= 100
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert square_p(0.8, 0, 1000) == 0.8 and square_p(0.8, 999, 1000) == 0.8 / 2**9


# ----------------------------------------------------------------------------- threat model
@pytest.mark.parametrize("name,norm,eps", [(name, "linf", 0.1) for name in ("fgsm", "pgd", "apgd-ce", "apgd-dlr",
                                                                             "square")]
                         + [(name, "l2", 0.8) for name in ("fgsm", "pgd", "apgd-ce", "apgd-dlr")])  # square: L∞ only
def test_attacks_stay_in_ball_and_range(digits_model, batch, name, norm, eps):
    x, y = batch
    g = torch.Generator().manual_seed(0)
    run = {"fgsm": lambda: fgsm(digits_model, x, y, eps, norm),
           "pgd": lambda: pgd(digits_model, x, y, eps, norm, steps=10, generator=g),
           "apgd-ce": lambda: apgd(digits_model, x, y, eps, norm, steps=20, generator=g),
           "apgd-dlr": lambda: apgd(digits_model, x, y, eps, norm, steps=20, loss="dlr", generator=g),
           "square": lambda: square(digits_model, x, y, eps, steps=100, generator=g)}[name]
    x_adv = run()
    dist = linf if norm == "linf" else l2
    assert x_adv.shape == x.shape
    assert (dist(x_adv, x) <= eps + 1e-5).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert accuracy(digits_model, x_adv, y) < accuracy(digits_model, x, y)


def test_attack_strength_orders_as_expected(digits_model, digits):
    x, y = digits.x_test, digits.y_test
    g = torch.Generator().manual_seed(0)
    clean = accuracy(digits_model, x, y)
    weak = accuracy(digits_model, fgsm(digits_model, x, y, EPS), y)
    strong = accuracy(digits_model, pgd(digits_model, x, y, EPS, steps=20, generator=g), y)
    assert strong <= weak < clean
    assert accuracy(digits_model, pgd(digits_model, x, y, 0.0, generator=g), y) == clean  # ε = 0 changes nothing
    assert accuracy(digits_model, pgd(digits_model, x, y, 0.5, generator=g), y) < 0.05  # a huge ball breaks it


def test_targeted_pgd_reaches_the_target(digits_model, batch):
    x, y = batch
    target = (y + 1) % 8
    x_adv = pgd(digits_model, x, target, 0.3, steps=40, targeted=True, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hit = (digits_model(x_adv).argmax(1) == target).float().mean().item()
    assert hit > 0.8


def test_restarts_attack_only_survivors(digits_model, batch):
    x, y = batch
    x_adv = pgd(digits_model, x, y, EPS, steps=20, restarts=3, generator=torch.Generator().manual_seed(1))
    single = pgd(digits_model, x, y, EPS, steps=20, restarts=1, generator=torch.Generator().manual_seed(1))
    assert accuracy(digits_model, x_adv, y) <= accuracy(digits_model, single, y)
    with torch.no_grad():  # a point fooled by the first restart keeps that adversarial input
        assert ((digits_model(x_adv).argmax(1) != y) | (digits_model(single).argmax(1) == y)).all()


def test_attacks_restore_modes_and_leave_parameters_alone(digits_model, batch):
    x, y = batch
    model = copy.deepcopy(digits_model)
    model.train()
    model[0].eval()  # a mixed state must come back exactly
    modes = [m.training for m in model.modules()]
    before = [p.clone() for p in model.parameters()]
    for attack in (lambda: fgsm(model, x, y, EPS), lambda: pgd(model, x, y, EPS, steps=3),
                   lambda: apgd(model, x, y, EPS, steps=5), lambda: square(model, x, y, EPS, steps=5)):
        attack()
        assert [m.training for m in model.modules()] == modes
        assert all(p.grad is None for p in model.parameters())
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ----------------------------------------------------------------------------- bad input
def test_bad_input_is_named(digits_model, batch):
    x, y = batch
    with pytest.raises(SafetylabError, match="eps must be a finite number >= 0"):
        pgd(digits_model, x, y, -0.1)
    with pytest.raises(SafetylabError, match=r"must lie in \[0.0, 1.0\]"):
        fgsm(digits_model, x * 255, y, EPS)
    with pytest.raises(SafetylabError, match=r"class indices in \[0, 7\]"):
        fgsm(digits_model, x, y + 8, EPS)
    with pytest.raises(SafetylabError, match="norm must be one of"):
        pgd(digits_model, x, y, EPS, norm="l1")
    with pytest.raises(SafetylabError, match=r"shape \(N=\d+, classes>=2\)"):
        fgsm(nn.Sequential(nn.Flatten(), nn.Linear(64, 1), nn.Flatten(0)), x, y, EPS)
    with pytest.raises(SafetylabError, match="training mode"):
        evaluate_robustness(copy.deepcopy(digits_model).train(), (x, y), EPS)
    with pytest.raises(SafetylabError, match="empty"):
        evaluate_robustness(digits_model, [], EPS)


# ----------------------------------------------------------------------------- evaluation
def test_accuracies_are_exact_shares(digits_model, digits):
    """Clean and robust accuracy are k / N to float64 rounding (they were float32 means: 5/7 read 0.71428573)."""
    x = digits.x_test[:7]
    y = predict_logits(digits_model, x).argmax(1)
    y[:2] = (y[:2] + 1) % digits.num_classes  # two wrong labels: 5 of 7 right
    result = evaluate_robustness(digits_model, (x, y), 0.0, attacks=("fgsm",))
    assert result.clean_accuracy == result.robust_accuracy == result.by_attack["fgsm"] == 5 / 7
    assert classifier_accuracy(digits_model, x, y) == 5 / 7


def test_ensemble_only_lowers_robust_accuracy(digits_model, digits):
    data = (digits.x_test[:160], digits.y_test[:160])
    result = evaluate_robustness(digits_model, data, EPS, attacks=("fgsm", "pgd", "apgd-ce", "square"),
                                 steps=20, square_queries=100)
    steps = [result.clean_accuracy, *result.by_attack.values()]
    assert all(a >= b for a, b in zip(steps, steps[1:]))
    assert result.robust_accuracy == steps[-1] < result.clean_accuracy
    # every point marked broken has a real adversarial example in x_adv, inside the ball
    with torch.no_grad():
        fooled = digits_model(result.x_adv).argmax(1) != data[1]
    correct = digits_model(data[0]).argmax(1) == data[1]
    assert torch.equal(fooled & correct, correct & ~result.robust)
    assert (linf(result.x_adv, data[0]) <= EPS + 1e-6).all()
    assert result.warnings == []


def test_robustness_curve_ensemble_never_above_single_attacks(digits_model, digits):
    rows = robustness_curve(digits_model, (digits.x_test[:128], digits.y_test[:128]), [0.0, 0.05, 0.15],
                            ensemble=("apgd-ce",), steps=10)
    assert rows[0]["ensemble"] == rows[0]["clean"] == rows[0]["pgd"]
    for row in rows:
        assert row["ensemble"] <= min(row["fgsm"], row["pgd"])
    assert rows[2]["ensemble"] < rows[1]["ensemble"]


class NoisyModel(nn.Module):
    """A randomised defence: Gaussian noise on the input at inference."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x + 0.2 * torch.randn_like(x))


class RoundedModel(nn.Module):
    """A non-differentiable defence: inputs quantised to 4 levels, the gradient cut."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner((x.detach() * 3).round() / 3)


def test_gradient_masking_is_flagged(digits_model, batch):
    x, y = batch
    assert gradient_masking(digits_model, x, y) == []
    assert "randomised" in gradient_masking(NoisyModel(digits_model).eval(), x, y)[0]
    assert "no gradient" in gradient_masking(RoundedModel(digits_model).eval(), x, y)[0]
    # the rounded model is only attacked by the black box, and the result says why
    result = evaluate_robustness(RoundedModel(digits_model).eval(), (x, y), 0.2, square_queries=200)
    assert list(result.by_attack) == ["square"]
    assert result.robust_accuracy < result.clean_accuracy
    assert any("no gradient" in w for w in result.warnings)


# ----------------------------------------------------------------------------- training
def test_epsilon_ramp():
    config = ClassifierTrainConfig(method="pgd", eps=0.2, ramp_epochs=4)
    # one step an epoch: the ramp reaches eps after 4 epochs
    assert [schedule(config, e, 1)[0] for e in range(6)] == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.2, 0.2])
    # five steps an epoch: linear per step, (step + 1) / 20 of eps
    assert [schedule(config, s, 5)[0] for s in (0, 4, 9, 19, 30)] == pytest.approx([0.01, 0.05, 0.1, 0.2, 0.2])
    warm = ClassifierTrainConfig(method="pgd", eps=0.2, warmup_epochs=1, ramp_epochs=2, eps_train_factor=1.5)
    assert [v for s in range(4) for v in schedule(warm, s, 1)] == pytest.approx([0, 0, 0.15, 0.5, 0.3, 1, 0.3, 1])
    assert schedule(ClassifierTrainConfig(), 0, 10) == (0.1, 1.0)  # no ramp: the full eps from the first step


def step(config: ClassifierTrainConfig, eps: float, seed: int = 0) -> Step:
    return Step(eps, 1.0, config, (0.0, 1.0), torch.Generator().manual_seed(seed))


def test_trades_loss_is_cross_entropy_plus_beta_kl(digits_model, batch):
    x, y = batch
    model = copy.deepcopy(digits_model)
    config = ClassifierTrainConfig(method="trades", trades_beta=6.0)
    clean = nn.functional.cross_entropy(model(x), y).item()
    assert trades_loss(model, x, y, step(config, 0.0))[0].item() == pytest.approx(clean)
    loss, stats = trades_loss(model, x, y, step(config, 0.1))
    assert loss.item() > clean and stats["accuracy"] == pytest.approx((model(x).argmax(1) == y).float().mean().item())
    # β = 0 leaves the clean cross-entropy; the KL term is what β weighs
    assert trades_loss(model, x, y, step(replace(config, trades_beta=0.0), 0.1))[0].item() == pytest.approx(clean)


def test_pgd_loss_is_cross_entropy_at_the_pgd_point(digits_model, batch):
    x, y = batch
    model = copy.deepcopy(digits_model)
    config = ClassifierTrainConfig(method="pgd", steps=5)
    assert pgd_loss(model, x, y, step(config, 0.0))[0].item() == pytest.approx(
        nn.functional.cross_entropy(model(x), y).item())
    loss, stats = pgd_loss(model, x, y, step(config, 0.1, seed=3))
    x_adv = pgd(model, x, y, 0.1, steps=5, early_stop=False, generator=torch.Generator().manual_seed(3))
    assert loss.item() == pytest.approx(nn.functional.cross_entropy(model(x_adv), y).item(), rel=1e-5)
    assert stats["adversarial_accuracy"] == pytest.approx((model(x_adv).argmax(1) == y).float().mean().item())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pgd", "trades"])
def test_adversarial_training_raises_robust_accuracy(digits, method):
    data = (digits.x_train, digits.y_train)
    test = (digits.x_test, digits.y_test)
    from safetylab.models.classifier import digits_cnn

    robust_acc = {}
    for m in ("standard", method):
        torch.manual_seed(0)
        model = digits_cnn(digits.num_classes)
        history = train_classifier(model, data, ClassifierTrainConfig(method=m, epochs=8, eps=0.15, steps=5))
        assert not model.training and len(history) == 8 and math.isfinite(history[-1]["loss"])
        robust_acc[m] = evaluate_robustness(model, test, 0.15, attacks=("pgd",)).robust_accuracy
    assert robust_acc[method] > robust_acc["standard"] + 0.2


def test_feature_vector_classifier(digits):
    """Tabular inputs (N, D): every attack, the evaluation and a detector work on a plain MLP."""
    from safetylab.robust.ood import Mahalanobis

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    x_train, x_test = digits.x_train.flatten(1), digits.x_test[:128].flatten(1)
    train_classifier(model, (x_train, digits.y_train), ClassifierTrainConfig(epochs=5))
    y = digits.y_test[:128]
    g = torch.Generator().manual_seed(0)
    for x_adv in (fgsm(model, x_test, y, 0.1), pgd(model, x_test, y, 0.1, steps=10, generator=g),
                  apgd(model, x_test, y, 0.1, steps=10, generator=g), square(model, x_test, y, 0.1, steps=50,
                                                                              generator=g)):
        assert x_adv.shape == x_test.shape and (linf(x_adv, x_test) <= 0.1 + 1e-6).all()
        assert accuracy(model, x_adv, y) < accuracy(model, x_test, y)
    result = evaluate_robustness(model, (x_test, y), 0.1, attacks=("pgd", "square"), square_queries=50)
    assert result.robust_accuracy < result.clean_accuracy
    detector = Mahalanobis(model).fit((x_train, digits.y_train))
    assert detector.score(torch.rand(64, 64)).mean() > detector.score(x_test).mean()
