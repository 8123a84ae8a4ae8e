import copy
import math
from dataclasses import replace
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

from safetylab.core.errors import SafetylabError
from safetylab.core.seeding import derive_seed, torch_seed
from safetylab.models.classifier import ClassifierTrainConfig, digits_mlp
from safetylab.robust.training import train_classifier
from safetylab.robust.uncertainty import (
    ensemble_probs,
    mc_dropout_probs,
    predictive_entropy,
    train_ensemble,
    uncertainty_split,
)


def _np_entropy(p: np.ndarray) -> np.ndarray:
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)


# ----------------------------------------------------------------------------- measures
def test_predictive_entropy_hand_worked():
    probs = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.25] * 4, [0.7, 0.2, 0.1, 0.0]])
    expected = [0.0, math.log(2), math.log(4), -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))]
    torch.testing.assert_close(predictive_entropy(probs), torch.tensor(expected))


def test_split_of_confident_members_that_disagree_is_all_epistemic():
    probs = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # two members, one input
    split = uncertainty_split(probs)
    torch.testing.assert_close(split.total, torch.tensor([math.log(2)]))
    torch.testing.assert_close(split.aleatoric, torch.tensor([0.0]))
    torch.testing.assert_close(split.epistemic, torch.tensor([math.log(2)]))


def test_split_of_identical_uniform_members_is_all_aleatoric():
    probs = torch.full((3, 2, 5), 0.2)
    split = uncertainty_split(probs)
    torch.testing.assert_close(split.aleatoric, torch.full((2,), math.log(5)))
    torch.testing.assert_close(split.total, torch.full((2,), math.log(5)))
    torch.testing.assert_close(split.epistemic, torch.zeros(2))


def test_split_matches_numpy_on_random_samples():
    gen = torch.Generator().manual_seed(0)
    probs = torch.randn(7, 50, 4, generator=gen, dtype=torch.float64).mul(3).softmax(-1)
    probs[0, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)  # exact zeros must not give NaN
    p = probs.numpy()
    total, aleatoric = _np_entropy(p.mean(0)), _np_entropy(p).mean(0)
    split = uncertainty_split(probs)
    np.testing.assert_allclose(split.total.numpy(), total, rtol=1e-10)
    np.testing.assert_allclose(split.aleatoric.numpy(), aleatoric, rtol=1e-10)
    np.testing.assert_allclose(split.epistemic.numpy(), total - aleatoric, atol=1e-12)
    assert (split.epistemic > 0).all()  # Jensen: strictly positive when the samples differ


@pytest.mark.parametrize("bad", [torch.full((2, 3), 1 / 3), torch.zeros(2, 0, 3), torch.full((2, 3, 1), 1.0),
                                 torch.tensor([[[0.6, 0.6]]]), torch.tensor([[[1.5, -0.5]]]),
                                 torch.tensor([[[float("nan"), 1.0]]])])
def test_split_rejects_what_is_not_probability_samples(bad):
    with pytest.raises(SafetylabError, match="probs_samples"):
        uncertainty_split(bad)


def test_predictive_entropy_rejects_bad_input():
    with pytest.raises(SafetylabError, match="probs"):
        predictive_entropy(torch.full((2, 2, 2), 0.5))
    with pytest.raises(SafetylabError, match="probabilities"):
        predictive_entropy(torch.tensor([[0.2, 0.2]]))


# ----------------------------------------------------------------------------- MC dropout
def _bn_dropout_net(p: float = 0.5) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(p), nn.Linear(16, 3))
    net[1].running_mean.normal_()
    return net.eval()


def test_mc_dropout_samples_vary_and_only_dropout_is_switched_on():
    net = _bn_dropout_net()
    x = torch.randn(10, 4)
    seen = {}

    def record(name, module, inputs, output):
        if len(inputs[0]) > 1:  # the sampling passes (the one-input pass checks the input shape)
            seen.setdefault(name, set()).add(module.training)

    for name, module in net.named_children():
        module.register_forward_hook(partial(record, name))
    running_mean = net[1].running_mean.clone()
    probs = mc_dropout_probs(net, x, samples=30, batch_size=4)
    assert probs.shape == (30, 10, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(30, 10))
    assert probs.std(0).min() > 1e-3  # every input sees different masks
    assert seen == {"0": {False}, "1": {False}, "2": {False}, "3": {True}, "4": {False}}
    torch.testing.assert_close(net[1].running_mean, running_mean)  # batch-norm stayed in eval mode
    assert not any(m.training for m in net.modules())


def test_mc_dropout_without_dropping_is_the_eval_prediction():
    net = _bn_dropout_net(p=0.0)
    x = torch.randn(9, 4)
    probs = mc_dropout_probs(net, x, samples=3, batch_size=4)
    expected = net(x).softmax(1).detach()
    for sample in probs:
        torch.testing.assert_close(sample, expected)


def test_mc_dropout_is_seeded_by_torch():
    net, x = _bn_dropout_net(), torch.randn(5, 4)
    torch.manual_seed(3)
    first = mc_dropout_probs(net, x, samples=4)
    torch.manual_seed(3)
    torch.testing.assert_close(mc_dropout_probs(net, x, samples=4), first)


def test_mc_dropout_restores_modes_on_error():
    net = _bn_dropout_net()

    def fail_while_sampling(module, inputs, output):
        if module.training:
            raise RuntimeError("the forward pass fails")

    net[3].register_forward_hook(fail_while_sampling)
    with pytest.raises(RuntimeError, match="the forward pass fails"):
        mc_dropout_probs(net, torch.randn(5, 4))
    assert not any(m.training for m in net.modules())
    with pytest.raises(SafetylabError, match=r"cannot take x of shape \(5, 7\)"):
        mc_dropout_probs(net, torch.randn(5, 7))  # wrong input width: refused before any sampling


def test_mc_dropout_on_the_digits_model(digits, digits_model):
    model = copy.deepcopy(digits_model)
    probs = mc_dropout_probs(model, digits.x_test[:64], samples=10)
    assert probs.shape == (10, 64, digits.num_classes)
    assert probs.std(0).max() > 0.01
    accuracy = (probs.mean(0).argmax(1) == digits.y_test[:64]).float().mean()
    assert accuracy > 0.9
    assert not any(m.training for m in model.modules())


def test_mc_dropout_rejects_models_it_cannot_use():
    with pytest.raises(SafetylabError, match="no dropout"):
        mc_dropout_probs(nn.Sequential(nn.Linear(4, 3)).eval(), torch.randn(2, 4))
    with pytest.raises(SafetylabError, match="training mode"):
        mc_dropout_probs(_bn_dropout_net().train(), torch.randn(2, 4))
    with pytest.raises(SafetylabError, match="samples"):
        mc_dropout_probs(_bn_dropout_net(), torch.randn(2, 4), samples=0)
    with pytest.raises(SafetylabError, match="non-empty"):
        mc_dropout_probs(_bn_dropout_net(), torch.randn(0, 4))


# ----------------------------------------------------------------------------- ensembles
def test_ensemble_probs_are_each_members_softmax():
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Linear(4, 3)).eval() for _ in range(3)]
    x = torch.randn(11, 4)
    probs = ensemble_probs(members, x, batch_size=4)
    assert probs.shape == (3, 11, 3)
    for member, p in zip(members, probs):
        torch.testing.assert_close(p, member(x).softmax(1).detach())


def test_ensemble_probs_rejects_bad_members():
    x = torch.randn(2, 4)
    good = nn.Linear(4, 3).eval()
    with pytest.raises(SafetylabError, match="agree on the classes"):
        ensemble_probs([good, nn.Linear(4, 5).eval()], x)
    with pytest.raises(SafetylabError, match=r"models\[1\] is in training mode"):
        ensemble_probs([good, nn.Linear(4, 3).train()], x)
    with pytest.raises(SafetylabError, match="non-empty list"):
        ensemble_probs([], x)
    with pytest.raises(SafetylabError, match="non-empty list"):
        ensemble_probs(good, x)


def test_train_ensemble_seeds_each_member(digits):
    data = (digits.x_train[:200], digits.y_train[:200])
    config = ClassifierTrainConfig(epochs=2, seed=5)
    members = train_ensemble(lambda: digits_mlp(digits.num_classes), data, config, members=2)
    seed = derive_seed(5, "ensemble", 1)
    with torch_seed(seed):  # member 1: initialised and trained from its derived seed
        expected = digits_mlp(digits.num_classes)
        train_classifier(expected, data, replace(config, seed=seed))
    for got, want in zip(members[1].state_dict().values(), expected.state_dict().values()):
        torch.testing.assert_close(got, want)
    first, second = (torch.cat([p.flatten() for p in m.parameters()]) for m in members)
    assert not torch.allclose(first, second)
    assert not any(m.training for member in members for m in member.modules())
    # seed + i offsets made seed 5's member 1 seed 6's member 0; derived seeds share no member
    other = train_ensemble(lambda: digits_mlp(digits.num_classes), data, replace(config, seed=6), members=1)
    assert not torch.allclose(second, torch.cat([p.flatten() for p in other[0].parameters()]))
    with pytest.raises(SafetylabError, match="members"):
        train_ensemble(lambda: digits_mlp(digits.num_classes), data, config, members=0)
