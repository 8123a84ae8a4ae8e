"""Certified training: the worst-case loss by hand, the ε/κ/β schedule by hand, bounds with gradients
that hold on sampled inputs, and IBP and CROWN-IBP training that make certificates possible where normal
training leaves none."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from safetylab.core.errors import SafetylabError
from safetylab.models.classifier import ClassifierTrainConfig, Step, digits_cnn, digits_mlp, fit_classifier, schedule
from safetylab.verify.bounds import Bounds, compute_bounds
from safetylab.verify.regions import linf_ball, margin_spec
from safetylab.verify.training import (
    certified_accuracy,
    certified_config,
    crown_ibp_loss,
    ibp_loss,
    margin_lower_bounds,
    robust_loss,
    train_certified,
)

EPS = 0.05  # train and test radius for the digits experiments (pixels in [0, 1])


def mlp():
    torch.manual_seed(0)
    return digits_mlp(8, hidden=64)


@pytest.fixture(scope="module")
def subset(digits):
    """600 training digits; the whole test split."""
    return digits.x_train[:600], digits.y_train[:600], digits.x_test, digits.y_test


@pytest.fixture(scope="module")
def normal_model(subset):
    model = mlp()
    fit_classifier(model, subset[:2], ClassifierTrainConfig(epochs=10, lr=3e-3))
    return model.eval()


def certified(method):
    return certified_config(method, eps=EPS, epochs=10, warmup_epochs=1, ramp_epochs=4, lr=3e-3)


# ----------------------------------------------------------------------------- robust_loss
def test_robust_loss_by_hand():
    # K = 3. Row 0: y = 0, margins f0 - f1 >= 1, f0 - f2 >= 2 -> z~ = (0, -1, -2).
    # Row 1: y = 2, margins f2 - f0 >= 0, f2 - f1 >= -1 -> z~ = (0, 1, 0).
    m = torch.tensor([[1.0, 2.0], [0.0, -1.0]], requires_grad=True)
    y = torch.tensor([0, 2])
    row0 = math.log(1 + math.exp(-1) + math.exp(-2))
    row1 = math.log(2 + math.e)
    loss = robust_loss(m, y)
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    loss.backward()  # d/dm_j log(1 + Σ exp(-m)) = -exp(-m_j) / (1 + Σ exp(-m)), halved by the mean
    expected = -torch.exp(-m.detach()) / (1 + torch.exp(-m.detach()).sum(1, keepdim=True)) / 2
    assert torch.allclose(m.grad, expected, atol=1e-6)


def test_robust_loss_takes_bounds_and_falls_with_the_margins():
    lower = torch.tensor([[0.5, 3.0, -1.0]])
    bounds = Bounds(lower, lower + 1, [], "ibp")
    y = torch.tensor([3])
    assert robust_loss(bounds, y).item() == pytest.approx(robust_loss(lower, y).item())
    assert robust_loss(lower + 1, y) < robust_loss(lower, y)
    assert robust_loss(torch.full((1, 3), 50.0), y).item() == pytest.approx(0.0, abs=1e-12)


def test_zero_eps_ibp_robust_loss_is_clean_cross_entropy(digits_model, digits):
    x, y = digits.x_test[:40], digits.y_test[:40]
    bounds = compute_bounds(digits_model, linf_ball(x, 0.0), margin_spec(y, 8), "ibp")
    with torch.no_grad():
        clean = F.cross_entropy(digits_model(x), y)
    assert robust_loss(bounds, y).item() == pytest.approx(clean.item(), rel=1e-4)


@pytest.mark.parametrize("margins, labels, match", [
    (torch.zeros(2), torch.tensor([0, 1]), "margins"),
    (torch.zeros(2, 2), torch.tensor([0, 3]), "labels"),
    (torch.zeros(2, 2), torch.tensor([0]), "labels"),
])
def test_robust_loss_bad_input(margins, labels, match):
    with pytest.raises(SafetylabError, match=match):
        robust_loss(margins, labels)


# ----------------------------------------------------------------------------- schedule
def test_schedule_by_hand(digits):
    # 5 steps per epoch: warm-up = steps 0-4, ramp = steps 5-14 (t = (step + 1 - 5) / 10), then flat.
    config = certified_config("crown-ibp", eps=0.2, warmup_epochs=1, ramp_epochs=2, kappa_end=0.5)
    expected = {0: (0.0, 0.0), 4: (0.0, 0.0), 5: (0.02, 0.1), 9: (0.1, 0.5), 14: (0.2, 1.0), 100: (0.2, 1.0)}
    for step, values in expected.items():
        assert schedule(config, step, 5) == pytest.approx(values), step
    ibp = certified_config("ibp", eps=0.2, warmup_epochs=1, ramp_epochs=2, eps_train_factor=1.1)
    assert schedule(ibp, 9, 5) == pytest.approx((0.11, 0.5))
    assert schedule(ibp, 14, 5) == pytest.approx((0.22, 1.0))
    jump = certified_config(eps=0.2, warmup_epochs=1, ramp_epochs=0, kappa_end=0.0)
    assert schedule(jump, 4, 5) == pytest.approx((0.0, 0.0))
    assert schedule(jump, 5, 5) == pytest.approx((0.2, 1.0))
    # κ = 1 − t (1 − kappa_end) in both losses; β = 1 − t in CROWN-IBP's, 0 in IBP's
    model, x, y = mlp().eval(), digits.x_train[:8], digits.y_train[:8]
    for t, kappa, beta in ((0.0, 1.0, 1.0), (0.4, 0.8, 0.6), (1.0, 0.5, 0.0)):
        step = Step(0.05 * t, t, config, (0.0, 1.0), torch.Generator())
        stats = crown_ibp_loss(model, x, y, step)[1]
        assert (stats["kappa"], stats["beta"]) == pytest.approx((kappa, beta)), t
        assert ibp_loss(model, x, y, replace(step, config=ibp))[1]["beta"] == 0.0


def test_certified_loss_mixes_clean_and_worst_case_cross_entropy(digits):
    model, x, y = mlp().eval(), digits.x_train[:16], digits.y_train[:16]
    config = certified_config("ibp", kappa_end=0.25)
    step = Step(0.03, 1.0, config, (0.0, 1.0), torch.Generator())
    loss, stats = ibp_loss(model, x, y, step)
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y)
    worst = robust_loss(margin_lower_bounds(model, x, y, 0.03, 0.0, 8), y)
    assert loss.item() == pytest.approx((0.25 * clean + 0.75 * worst).item(), rel=1e-5)
    assert stats["verified"] <= stats["accuracy"]
    model.train()  # the loss computes its bounds in eval mode and leaves the model's own mode alone
    assert ibp_loss(model, x, y, step)[0].item() == pytest.approx(loss.item(), rel=1e-5) and model.training


# ----------------------------------------------------------------------------- bounds used in training
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_training_bounds_are_sound_and_reach_every_parameter(digits, beta):
    torch.manual_seed(1)
    model = digits_cnn(8, width=4, hidden=16).eval()
    x, y = digits.x_train[:8], digits.y_train[:8]
    lower = margin_lower_bounds(model, x, y, 0.1, beta, 8)
    lower.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with torch.no_grad():  # below the margins of random points of the ball
        for _ in range(20):
            z = (x + 0.1 * (2 * torch.rand_like(x) - 1)).clamp(0, 1)
            margins = torch.einsum("bsk,bk->bs", margin_spec(y, 8), model(z))
            assert (lower <= margins + 1e-5).all()
        ibp = compute_bounds(model, linf_ball(x, 0.1), margin_spec(y, 8), "ibp").lower
        crown = compute_bounds(model, linf_ball(x, 0.1), margin_spec(y, 8), "crown").lower
    if beta == 0:
        assert torch.allclose(lower, ibp, atol=1e-5)
    else:  # CROWN-IBP's intermediate intervals are IBP's, so it is never tighter than full CROWN
        assert (lower <= crown + 1e-4).all()
        assert not torch.allclose(lower, ibp, atol=1e-3)


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("method", ["ibp", "crown-ibp"])
def test_certified_training_certifies_what_normal_training_does_not(subset, normal_model, method):
    x, y, x_test, y_test = subset
    model = mlp()
    history = train_certified(model, (x, y), certified(method))
    assert not model.training
    assert len(history) == 10 and [h["epoch"] for h in history] == list(range(1, 11))
    assert history[0]["eps"] == 0.0 and history[0]["kappa"] == 1.0
    assert history[0]["verified"] == pytest.approx(history[0]["accuracy"])  # bounds at eps 0 are exact
    assert history[-1]["eps"] == pytest.approx(EPS) and history[-1]["kappa"] == pytest.approx(0.5)
    assert history[-1]["beta"] == 0.0
    if method == "crown-ibp":  # 10 steps an epoch (9 of 64 digits, 1 of 24): epoch 3 is steps 20-29, t = 11/40 …
        # 20/40 of the ramp, and the record holds the mean over the epoch's digits
        assert history[2]["beta"] == pytest.approx((sum(64 * (1 - (11 + k) / 40) for k in range(9)) + 24 * 0.5) / 600)
        assert history[2]["eps"] == pytest.approx(EPS / 2)  # the epoch's last step: half-way
    # measured: IBP-certified test accuracy 0.75 (ibp) / 0.73 (crown-ibp) against 0.0 for the normal network
    trained = certified_accuracy(model, x_test, y_test, EPS, "ibp")
    assert trained > 0.6
    assert certified_accuracy(normal_model, x_test, y_test, EPS, "ibp") < 0.1
    with torch.no_grad():
        assert (model(x_test).argmax(1) == y_test).float().mean() > 0.9
    # the last epoch's verified share is of the training bounds at the full eps: near the final certificate
    assert abs(history[-1]["verified"] - certified_accuracy(model, x, y, EPS, "ibp")) < 0.1
    # a tighter method certifies at least as many
    assert certified_accuracy(model, x_test, y_test, EPS, "crown") >= trained


def test_training_is_reproducible_and_logs(tmp_path, digits):
    from safetylab.core.runs import RunDir

    data = (digits.x_train[:64], digits.y_train[:64])
    config = certified_config("crown-ibp", eps=0.1, epochs=2, batch_size=32, warmup_epochs=0, ramp_epochs=1)
    first, second = mlp(), mlp()
    run = RunDir(tmp_path, {"config": "test"})
    h1 = train_certified(first, data, config, run=run)
    h2 = train_certified(second, data, config)
    assert h1 == h2
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2
    assert all(p.grad is None for p in first.parameters())


def test_certified_accuracy_at_zero_eps_is_clean_accuracy(digits_model, digits):
    x, y = digits.x_test[:50], digits.y_test[:50]
    with torch.no_grad():
        clean = (digits_model(x).argmax(1) == y).float().mean().item()
    for method in ("ibp", "crown", "alpha-crown"):
        assert certified_accuracy(digits_model, x, y, 0.0, method, batch_size=16) == pytest.approx(clean)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, match", [
    ({"eps": -0.1}, "eps"),
    ({"method": "pgd"}, "method"),
    ({"epochs": 0}, "epochs"),
    ({"ramp_epochs": -1}, "ramp_epochs"),
    ({"kappa_end": 1.5}, "kappa_end"),
    ({"eps_train_factor": 0.0}, "eps_train_factor"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(SafetylabError, match=match):
        certified_config(**kwargs)


def test_bad_training_input(digits):
    data = (digits.x_train[:16], digits.y_train[:16])
    config = certified_config(epochs=1)
    unsupported = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 8))
    with pytest.raises(SafetylabError, match="Tanh"):
        train_certified(unsupported, data, config)
    with pytest.raises(SafetylabError, match="empty"):
        train_certified(mlp(), [], config)
    with pytest.raises(SafetylabError, match="labels"):
        train_certified(mlp(), (data[0], data[1][:8]), config)
    with pytest.raises(SafetylabError, match=r"\[0.0, 1.0\]"):
        train_certified(mlp(), (data[0] * 2, data[1]), config)


def test_bad_certified_accuracy_input(digits_model, digits):
    x, y = digits.x_test[:4], digits.y_test[:4]
    with pytest.raises(SafetylabError, match="eps"):
        certified_accuracy(digits_model, x, y, -0.1)
    with pytest.raises(SafetylabError, match="method"):
        certified_accuracy(digits_model, x, y, 0.1, "crown-ibp")
    training = copy.deepcopy(digits_model).train()
    with pytest.raises(SafetylabError, match="training mode"):
        certified_accuracy(training, x, y, 0.1)
