"""Every entry point of :mod:`safetylab.robust` refuses bad input with a SafetylabError that names the argument
and what was expected, before any work: never a raw error from inside torch, never a silently wrong result."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from safetylab.core.errors import ConfigError, SafetylabError
from safetylab.core.tensors import predict_logits
from safetylab.models.classifier import ClassifierTrainConfig, digits_cnn
from safetylab.robust.attacks import apgd, fgsm, pgd, project, random_start, square, trades_adversary
from safetylab.robust.calibration import TemperatureScaled, calibration_metrics
from safetylab.robust.evaluate import attack_by_name, evaluate_robustness, gradient_masking
from safetylab.robust.ood import KNN, MSP, ODIN, Energy, Mahalanobis, Uncertainty
from safetylab.robust.selective import Criterion, SelectiveClassifier, criterion_for_risk, msp_score
from safetylab.robust.shift import shift_report
from safetylab.robust.study import RobustStudyConfig
from safetylab.robust.training import train_classifier
from safetylab.robust.uncertainty import ensemble_probs, mc_dropout_probs

EPS = 0.1


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return digits_cnn().eval()


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(0)
    return torch.rand(6, 1, 8, 8, generator=gen), torch.randint(0, 8, (6,), generator=gen)


def _fitted(cls, model):
    gen = torch.Generator().manual_seed(1)
    return cls(model).fit((torch.rand(300, 1, 8, 8, generator=gen), torch.randint(0, 8, (300,), generator=gen)))


# Each entry point as fn(model, x, y).
ENTRY_POINTS = {
    "fgsm": lambda m, x, y: fgsm(m, x, y, EPS),
    "pgd": lambda m, x, y: pgd(m, x, y, EPS, steps=2),
    "apgd": lambda m, x, y: apgd(m, x, y, EPS, steps=2),
    "square": lambda m, x, y: square(m, x, y, EPS, steps=2),
    "evaluate_robustness": lambda m, x, y: evaluate_robustness(m, (x, y), EPS, steps=2, square_queries=2),
    "gradient_masking": lambda m, x, y: gradient_masking(m, x, y),
    "train_classifier": lambda m, x, y: train_classifier(copy.deepcopy(m), (x, y), ClassifierTrainConfig(epochs=1)),
    "predict_logits": lambda m, x, y: predict_logits(m, x),
    "msp": lambda m, x, y: MSP(m).score(x),
    "odin": lambda m, x, y: ODIN(m).score(x),
    "energy": lambda m, x, y: Energy(m).score(x),
    "mahalanobis.fit": lambda m, x, y: Mahalanobis(m).fit((x, y)),
    "mahalanobis.score": lambda m, x, y: _fitted(Mahalanobis, m).score(x),
    "knn.fit": lambda m, x, y: KNN(m).fit((x, y)),
    "knn.score": lambda m, x, y: _fitted(KNN, m).score(x),
    "mc-dropout": lambda m, x, y: Uncertainty(m, samples=2).score(x),
    "ensemble": lambda m, x, y: Uncertainty([m, m]).score(x),
    "selective": lambda m, x, y: SelectiveClassifier(m, [Criterion("msp", msp_score(m), 0.0)]).predict(x),
    "shift_report": lambda m, x, y: shift_report(m, x, y, severities=[1]),
}

# (what is wrong, (x, y) -> bad (x, y), expected message)
BAD_INPUTS = [
    ("numpy array", lambda x, y: (x.numpy(), y), r"torch\.Tensor.*torch\.as_tensor"),
    ("float64 on a float32 model", lambda x, y: (x.double(), y), r"torch\.float64 but the model computes in "
                                                                   r"torch\.float32"),
    ("raw uint8 pixels", lambda x, y: ((x * 255).to(torch.uint8), y), r"floating-point.*torch\.uint8"),
    ("0/1 integer tensor", lambda x, y: ((x > 0.5).long(), y), r"floating-point.*torch\.int64"),
    ("no batch dimension", lambda x, y: (x[0], y[:1]), r"shape \(1, 8, 8\).*batch dimension"),
    ("NaN", lambda x, y: (torch.full_like(x, math.nan), y), "NaN"),
]


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("what,spoil,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_are_named(model, batch, entry, what, spoil, match):
    x, y = spoil(*batch)
    with pytest.raises(SafetylabError, match=match):
        ENTRY_POINTS[entry](model, x, y)


LABELLED = ["fgsm", "pgd", "apgd", "square", "evaluate_robustness", "gradient_masking", "train_classifier",
            "mahalanobis.fit", "shift_report"]
BAD_LABELS = [
    ("numpy labels", lambda y: y.numpy(), r"torch\.Tensor|1-D integer tensor"),
    ("too few labels", lambda y: y[:4], r"4 labels for 6 inputs|6 inputs but 4 labels|N=6"),
    ("float labels", lambda y: y.float(), "integer"),
]


@pytest.mark.parametrize("entry", LABELLED)
@pytest.mark.parametrize("what,spoil,match", BAD_LABELS, ids=[b[0] for b in BAD_LABELS])
def test_bad_labels_are_named(model, batch, entry, what, spoil, match):
    x, y = batch
    with pytest.raises(SafetylabError, match=match):
        ENTRY_POINTS[entry](model, x, spoil(y))


def test_other_label_consumers(model, batch):
    x, y = batch
    with pytest.raises(SafetylabError, match="y_val"):
        criterion_for_risk("msp", msp_score(model), model, x, y.numpy(), 0.1)
    with pytest.raises(SafetylabError, match="labels"):
        calibration_metrics(torch.full((6, 8), 1 / 8), y.numpy())


# (call, expected message): every numeric and name argument of the attacks and detectors
BAD_ARGUMENTS = {
    "pgd loss": (lambda m, x, y: pgd(m, x, y, EPS, steps=2, loss="cw"), "loss must be one of ce, dlr, got 'cw'"),
    "apgd loss": (lambda m, x, y: apgd(m, x, y, EPS, steps=2, loss="cw"), "loss must be one of ce, dlr, got 'cw'"),
    "pgd steps": (lambda m, x, y: pgd(m, x, y, EPS, steps=0), "steps must be an integer >= 1"),
    "pgd fractional steps": (lambda m, x, y: pgd(m, x, y, EPS, steps=2.5), "steps must be an integer >= 1"),
    "pgd restarts": (lambda m, x, y: pgd(m, x, y, EPS, steps=2, restarts=0), "restarts must be an integer >= 1"),
    "pgd negative step size": (lambda m, x, y: pgd(m, x, y, EPS, steps=2, step_size=-0.01),
                               "step_size must be a finite number > 0"),
    "pgd zero step size": (lambda m, x, y: pgd(m, x, y, EPS, steps=2, step_size=0.0),
                           "step_size must be a finite number > 0"),
    "apgd steps": (lambda m, x, y: apgd(m, x, y, EPS, steps=0), "steps must be an integer >= 1"),
    "apgd restarts": (lambda m, x, y: apgd(m, x, y, EPS, steps=2, restarts=0), "restarts must be an integer >= 1"),
    "apgd rho": (lambda m, x, y: apgd(m, x, y, EPS, steps=2, rho=2.0), r"rho must be a number in \[0, 1\]"),
    "apgd momentum": (lambda m, x, y: apgd(m, x, y, EPS, steps=2, momentum=-0.5),
                      r"momentum must be a number in \[0, 1\]"),
    "square steps": (lambda m, x, y: square(m, x, y, EPS, steps=0), "steps must be an integer >= 1"),
    "square p_init": (lambda m, x, y: square(m, x, y, EPS, steps=2, p_init=-1.0), r"p_init must be a number in"),
    "fgsm negative eps": (lambda m, x, y: fgsm(m, x, y, -0.1), "eps must be a finite number >= 0"),
    "pgd infinite eps": (lambda m, x, y: pgd(m, x, y, math.inf, steps=2), "eps must be a finite number >= 0"),
    "pgd eps as text": (lambda m, x, y: pgd(m, x, y, "0.1", steps=2), "eps must be a finite number >= 0"),
    "trades steps": (lambda m, x, y: trades_adversary(m, x, EPS, steps=0), "steps must be an integer >= 1"),
    "trades norm": (lambda m, x, y: trades_adversary(m, x, EPS, norm="l1"), "norm must be one of linf, l2"),
    "evaluate steps": (lambda m, x, y: evaluate_robustness(m, (x, y), EPS, steps=0),
                       "steps must be an integer >= 1"),
    "evaluate queries": (lambda m, x, y: evaluate_robustness(m, (x, y), EPS, square_queries=0),
                         "square_queries must be an integer >= 1"),
    "evaluate batch size": (lambda m, x, y: evaluate_robustness(m, (x, y), EPS, steps=2, batch_size=0),
                            "batch_size must be an integer >= 1"),
    "evaluate norm": (lambda m, x, y: evaluate_robustness(m, (x, y), EPS, norm="l3"),
                      "norm must be one of linf, l2, got 'l3'"),
    "evaluate attack": (lambda m, x, y: evaluate_robustness(m, (x, y), EPS, attacks=["cw"]),
                        "attack must be one of"),
    "evaluate attack pair": (lambda m, x, y: evaluate_robustness(m, (x, y), EPS, attacks=[3]),
                             r"attacks\[0\] must be an attack name or a \(name, function\) pair"),
    "evaluate custom attack shape": (  # labels the model gets right, so that the attack runs
        lambda m, x, y: evaluate_robustness(m, (x, predict_logits(m, x).argmax(1)), EPS,
                                            attacks=[("flat", lambda m, x, y, e: x.flatten(1))]),
        r"attack flat must return x′ of shape \(6, 1, 8, 8\)"),
    "evaluate no attack": (lambda m, x, y: evaluate_robustness(m, (x, y), EPS, attacks=()), "attacks is empty"),
    "bounds of three": (lambda m, x, y: fgsm(m, x, y, EPS, bounds=(0, 1, 2)), r"bounds must be \(low, high\)"),
    "no bounds": (lambda m, x, y: pgd(m, x, y, EPS, bounds=None), r"bounds must be \(low, high\)"),
    "project norm": (lambda m, x, y: project(x, x, EPS, norm="l3"), "norm must be one of linf, l2"),
    "random_start norm": (lambda m, x, y: random_start(x, EPS, norm="linf "), "norm must be one of linf, l2"),
    "model on another device": (lambda m, x, y: fgsm(copy.deepcopy(m).to("meta"), x, y, EPS),
                                "x is on cpu but the model on meta"),
    "attack_by_name steps": (lambda m, x, y: attack_by_name("apgd-ce", steps=0), "steps must be an integer >= 1"),
    "predict_logits batch size": (lambda m, x, y: predict_logits(m, x, batch_size=0),
                                  "batch_size must be an integer >= 1"),
    "detector batch size": (lambda m, x, y: MSP(m, batch_size=0), "batch_size must be an integer >= 1"),
    "odin temperature": (lambda m, x, y: ODIN(m, temperature=math.inf), "temperature must be a finite number > 0"),
    "energy temperature": (lambda m, x, y: Energy(m, temperature=0.0), "temperature must be a finite number > 0"),
    "mahalanobis ridge": (lambda m, x, y: Mahalanobis(m, ridge=-1.0), "ridge must be a finite number >= 0"),
    "knn k": (lambda m, x, y: KNN(m, k=2.5), "k must be an integer >= 1"),
    "mc-dropout samples": (lambda m, x, y: Uncertainty(m, samples=0), "samples must be an integer >= 1"),
    "uncertainty batch size": (lambda m, x, y: Uncertainty(m, batch_size=-1), "batch_size must be an integer >= 1"),
    "empty ensemble": (lambda m, x, y: Uncertainty([]), "model_or_models"),
    "temperature scaling": (lambda m, x, y: TemperatureScaled(m, 0.0), "temperature must be a finite number > 0"),
    "mc_dropout_probs batch size": (lambda m, x, y: mc_dropout_probs(m, x, batch_size=0),
                                    "batch_size must be an integer >= 1"),
    "ensemble_probs batch size": (lambda m, x, y: ensemble_probs([m], x, batch_size=0),
                                  "batch_size must be an integer >= 1"),
    "shift_report batch size": (lambda m, x, y: shift_report(m, x, y, batch_size=0),
                                "batch_size must be an integer >= 1"),
}


@pytest.mark.parametrize("name", sorted(BAD_ARGUMENTS))
def test_bad_arguments_are_named(model, batch, name):
    call, match = BAD_ARGUMENTS[name]
    with pytest.raises(SafetylabError, match=match):
        call(model, *batch)


def test_numpy_numbers_are_numbers(model, batch):
    x, y = batch
    assert TemperatureScaled(model, np.float32(1.5)).temperature.item() == 1.5
    assert pgd(model, x, y, np.float64(EPS), steps=np.int64(2), step_size=np.float32(0.05)).shape == x.shape


@pytest.mark.parametrize("cls", [MSP, ODIN, Energy])
def test_logit_detectors_refuse_nan_logits(cls, model):
    """A NaN score is never above a threshold (NaN > t is False): it would pass as in-distribution."""
    logits = torch.tensor([[1.0, 2.0], [math.nan, 0.0]])
    with pytest.raises(SafetylabError, match="z holds NaN or infinite logits"):
        cls(model).score_features(logits)
    with pytest.raises(SafetylabError, match=r"z must be logits of shape \(N, classes>=2\)"):
        cls(model).score_features(torch.ones(3))


@pytest.mark.parametrize("changes,field", [
    ({"lr": -1.0}, "lr"), ({"lr": math.nan}, "lr"), ({"weight_decay": -0.1}, "weight_decay"),
    ({"norm": "l3"}, "norm"), ({"step_size": -0.01}, "step_size"), ({"step_size": 0.0}, "step_size"),
    ({"trades_beta": -1.0}, "trades_beta"), ({"ramp_epochs": -1}, "ramp_epochs"),
    ({"warmup_epochs": 1.5}, "warmup_epochs"), ({"lr_schedule": "cosine"}, "lr_schedule"),
    ({"kappa_end": 1.5}, "kappa_end"), ({"eps_train_factor": 0.0}, "eps_train_factor"), ({"seed": -1}, "seed"),
    ({"epochs": 0}, "epochs"), ({"batch_size": 0}, "batch_size"), ({"steps": 0}, "steps"),
    ({"eps": -0.1}, "eps"), ({"eps": math.inf}, "eps"), ({"sigma": 0.0}, "sigma"), ({"method": "fgsm"}, "method"),
])
def test_training_config_is_checked_when_built(changes, field):
    with pytest.raises(ConfigError) as info:
        ClassifierTrainConfig(**changes)
    assert info.value.field == field


@pytest.mark.parametrize("changes,field", [
    ({"attack_steps": 0}, "attack_steps"), ({"square_queries": 0}, "square_queries"),
    ({"ensemble_members": 0}, "ensemble_members"), ({"mc_samples": 0}, "mc_samples"),
    ({"eps": ()}, "eps"), ({"eps": (0.1, -0.1)}, "eps"), ({"detectors": ()}, "detectors"),
    ({"detectors": ("msp", "cw")}, "detectors"), ({"coverage": 1.5}, "coverage"), ({"ood_tpr": -0.1}, "ood_tpr"),
    ({"arch": "vit"}, "arch"), ({"standard": ClassifierTrainConfig(method="pgd")}, "standard"),
    ({"adversarial": (ClassifierTrainConfig(method="ibp"),)}, "adversarial"),
    ({"adversarial": (ClassifierTrainConfig(method="pgd"), ClassifierTrainConfig(method="pgd"))}, "adversarial"),
])
def test_study_config_is_checked_when_built(changes, field):
    with pytest.raises(ConfigError) as info:
        RobustStudyConfig(**changes)
    assert info.value.field == field
