import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.covariance import EmpiricalCovariance
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from torch import nn

from safetylab.core.errors import SafetylabError
from safetylab.models.classifier import ClassifierTrainConfig, digits_mlp
from safetylab.robust.ood import (
    DETECTORS,
    KNN,
    MSP,
    ODIN,
    Detector,
    Energy,
    Mahalanobis,
    Uncertainty,
    aupr_in,
    aupr_out,
    auroc,
    fpr_at_tpr,
    ood_metrics,
    penultimate_features,
)
from safetylab.robust.uncertainty import predictive_entropy, train_ensemble


# ----------------------------------------------------------------------------- metrics against scikit-learn
def _sklearn_metrics(s_in: np.ndarray, s_out: np.ndarray) -> dict[str, float]:
    scores = np.concatenate([s_in, s_out])
    is_out = np.concatenate([np.zeros(len(s_in)), np.ones(len(s_out))])
    fpr, tpr, _ = roc_curve(1 - is_out, -scores, drop_intermediate=False)  # in-distribution positive
    return {"auroc": roc_auc_score(is_out, scores), "aupr_in": average_precision_score(1 - is_out, -scores),
            "aupr_out": average_precision_score(is_out, scores), "fpr95": fpr[np.searchsorted(tpr, 0.95)]}


@pytest.mark.parametrize("seed", range(12))
def test_metrics_match_sklearn_with_and_without_ties(seed):
    gen = torch.Generator().manual_seed(seed)
    n_in, n_out = torch.randint(1, 300, (2,), generator=gen).tolist()
    if seed % 3 == 0:  # continuous scores, overlapping
        s_in, s_out = torch.randn(n_in, generator=gen), torch.randn(n_out, generator=gen) + 1
    elif seed % 3 == 1:  # heavy ties: a handful of integer values
        s_in, s_out = torch.randint(0, 4, (n_in,), generator=gen), torch.randint(1, 6, (n_out,), generator=gen)
    else:  # ties across the two sets and within each, as floats
        s_in = torch.randint(0, 3, (n_in,), generator=gen).float() / 2
        s_out = torch.randint(0, 3, (n_out,), generator=gen).float() / 2
    got = ood_metrics(s_in, s_out)
    want = _sklearn_metrics(s_in.double().numpy(), s_out.double().numpy())
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-6), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(4))
def test_metrics_match_sklearn_to_float64_rounding(seed, dtype):
    """Every metric is a ratio of counts: exact to float64 rounding whatever the scores' dtype (AUPR-In and
    AUPR-Out were once computed in float32, off by up to 1.4e-7)."""
    gen = torch.Generator().manual_seed(seed)
    s_in = torch.randn(3000, generator=gen, dtype=torch.float64)
    s_out = torch.randn(2000, generator=gen, dtype=torch.float64) + 0.5
    if seed % 2:  # ties within and across the two sets
        s_in, s_out = (s_in * 8).round() / 8, (s_out * 8).round() / 8
    s_in, s_out = s_in.to(dtype), s_out.to(dtype)
    got = ood_metrics(s_in, s_out)
    want = _sklearn_metrics(s_in.double().numpy(), s_out.double().numpy())
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=0, abs=1e-12), key


def test_auroc_hand_worked_with_ties():
    # pairs (in, out): (0,1) 1, (0,2) 1, (1,1) tie 1/2, (1,2) 1 -> 3.5 / 4
    assert auroc(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 2.0])) == 0.875
    assert auroc(torch.tensor([3, 3]), torch.tensor([3])) == 0.5


def test_fpr_at_tpr_hand_worked_with_ties():
    scores_in = torch.cat([torch.zeros(10), torch.full((10,), 5.0)])
    # 95 % of 20 = 19 accepted: only t = 5 accepts 19 (and then all 20); OOD scores <= 5 are accepted
    assert fpr_at_tpr(scores_in, torch.tensor([5.0, 5.0, 6.0, 4.0])) == 0.75
    # 50 % = 10 accepted already at t = 0
    assert fpr_at_tpr(scores_in, torch.tensor([0.0, 1.0, -1.0, 5.0]), tpr=0.5) == 0.5
    # 0.7 · 10 is 7.000000000000001 in floating point: still the 7th smallest score, t = 6
    assert fpr_at_tpr(torch.arange(10.0), torch.tensor([6.0, 7.0]), tpr=0.7) == 0.5
    # 0..19: t = 18, the 19th smallest; 18 and 0 are accepted
    assert fpr_at_tpr(torch.arange(20.0), torch.tensor([18.0, 19.0, 20.0, 0.0, 25.0])) == 0.4
    assert fpr_at_tpr(torch.arange(20.0), torch.tensor([18.0]), tpr=1.0) == 1.0


def test_metrics_on_separated_scores():
    s_in, s_out = torch.arange(10.0), torch.arange(10.0) + 100
    assert ood_metrics(s_in, s_out) == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0}
    assert auroc(s_out, s_in) == 0.0
    assert fpr_at_tpr(s_out, s_in) == 1.0


def test_metrics_mix_integer_and_float_scores():
    s_in, s_out = torch.tensor([0, 1, 2], dtype=torch.uint8), torch.tensor([1.5, 2.5], dtype=torch.float64)
    assert auroc(s_in, s_out) == pytest.approx(roc_auc_score([0, 0, 0, 1, 1], [0, 1, 2, 1.5, 2.5]))
    assert aupr_in(s_in, s_out) == pytest.approx(average_precision_score([1, 1, 1, 0, 0], [0, -1, -2, -1.5, -2.5]))


@pytest.mark.parametrize("metric", [auroc, aupr_in, aupr_out, fpr_at_tpr])
def test_metrics_reject_bad_scores(metric):
    ok = torch.tensor([0.1, 0.2])
    with pytest.raises(SafetylabError, match="scores_in is empty"):
        metric(torch.tensor([]), ok)
    with pytest.raises(SafetylabError, match="scores_out holds NaN"):
        metric(ok, torch.tensor([0.3, float("nan")]))
    with pytest.raises(SafetylabError, match="scores_in must be a 1-D"):
        metric(ok[:, None], ok)
    with pytest.raises(SafetylabError, match="scores_out must be a 1-D"):
        metric(ok, [0.1])


def test_fpr_at_tpr_rejects_bad_tpr():
    with pytest.raises(SafetylabError, match="tpr"):
        fpr_at_tpr(torch.zeros(3), torch.ones(3), tpr=0.0)


# ----------------------------------------------------------------------------- logit detectors
def _grads(model: nn.Module) -> list:
    """The parameters' gradients as lists (the fixture's model keeps those of its last training step)."""
    return [None if p.grad is None else p.grad.tolist() for p in model.parameters()]


def test_logit_scores_hand_worked():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    model = nn.Linear(2, 2).eval()
    torch.testing.assert_close(MSP(model).score_features(logits), torch.tensor([-0.5, -0.75]))
    torch.testing.assert_close(Energy(model).score_features(logits), -torch.log(torch.tensor([2.0, 4.0])))
    torch.testing.assert_close(Energy(model, temperature=2.0).score_features(logits),
                               -2 * torch.log(torch.tensor([2.0, 3 ** 0.5 + 1])))
    odin = ODIN(model, temperature=1000.0).score_features(logits)
    torch.testing.assert_close(odin, -torch.tensor([0.5, 1 / (1 + 3 ** -0.001)]))


@pytest.mark.parametrize("cls", [MSP, Energy])
def test_score_is_score_features_of_the_logits(cls, digits, digits_model):
    det = cls(digits_model, batch_size=50).fit((digits.x_train, digits.y_train))
    with torch.no_grad():
        logits = digits_model(digits.x_test)
    torch.testing.assert_close(det.score(digits.x_test), det.score_features(logits))


def test_odin_matches_a_direct_implementation(digits, digits_model):
    x, temperature, eps = digits.x_test[:40], 1000.0, 0.0014
    grads_before = _grads(digits_model)
    x_grad = x.clone().requires_grad_(True)
    logits = digits_model(x_grad) / temperature
    loss = F.cross_entropy(logits, logits.argmax(1), reduction="sum")  # −log S_ŷ(x; T)
    (grad,) = torch.autograd.grad(loss, x_grad)
    x_tilde = (x - eps * grad.sign()).clamp(0, 1)
    with torch.no_grad():
        expected = -(digits_model(x_tilde) / temperature).softmax(1).max(1).values
    torch.testing.assert_close(ODIN(digits_model, batch_size=16).score(x), expected)
    assert _grads(digits_model) == grads_before
    with torch.no_grad():
        plain = ODIN(digits_model).score_features(digits_model(x))
    torch.testing.assert_close(ODIN(digits_model, eps=0.0).score(x), plain)
    with pytest.raises(SafetylabError, match=r"must lie in \[0.0, 1.0\]"):
        ODIN(digits_model).score(x + 2)


# ----------------------------------------------------------------------------- feature detectors
def _naive_mahalanobis(z_train, y_train, z, ridge):
    z_train, z = z_train.double(), z.double()
    classes = y_train.unique()
    means = torch.stack([z_train[y_train == c].mean(0) for c in classes])
    centred = z_train - means[torch.searchsorted(classes, y_train)]
    cov = centred.T @ centred / len(z_train)
    cov += ridge * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype)
    precision = torch.linalg.inv(cov)
    dists = [((z - mu) @ precision * (z - mu)).sum(1) for mu in means]
    return torch.stack(dists, 1).min(1).values


@pytest.mark.parametrize("ridge", [0.0, 1e-6, 0.1])
def test_mahalanobis_equals_a_loop_over_classes(ridge):
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (300,), generator=gen) * 3  # labels need not be 0..C-1
    z = torch.randn(300, 6, generator=gen) @ torch.randn(6, 6, generator=gen) + y[:, None] + 50  # far from 0
    queries = torch.randn(40, 6, generator=gen) * 3 + 50
    det = Mahalanobis(nn.Linear(1, 1), ridge=ridge).fit_features(z, y)
    expected = _naive_mahalanobis(z, y, queries, ridge).float()
    torch.testing.assert_close(det.score_features(queries), expected, rtol=1e-4, atol=1e-4)


def test_mahalanobis_without_ridge_matches_sklearn_covariance():
    gen = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (200,), generator=gen)
    z = torch.randn(200, 4, generator=gen) + 2 * y[:, None]
    queries = torch.randn(30, 4, generator=gen)
    means = [z[y == c].mean(0) for c in range(3)]
    cov = EmpiricalCovariance(assume_centered=True).fit((z - torch.stack(means)[y]).double().numpy())
    expected = np.min([cov.mahalanobis((queries - mu).double().numpy()) for mu in means], axis=0)
    got = Mahalanobis(nn.Linear(1, 1), ridge=0.0).fit_features(z, y).score_features(queries)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4)


def test_knn_equals_brute_force():
    gen = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(300, 8, generator=gen), torch.randn(37, 8, generator=gen)
    dists = torch.cdist(F.normalize(queries.double(), dim=1), F.normalize(bank.double(), dim=1))
    for k in (1, 5, 50):
        det = KNN(nn.Linear(1, 1), k=k, batch_size=7).fit_features(bank)
        expected = dists.sort(1).values[:, k - 1].float()
        torch.testing.assert_close(det.score_features(queries), expected, rtol=1e-4, atol=1e-4)
    capped = KNN(nn.Linear(1, 1), k=1000).fit_features(bank).score_features(queries)
    torch.testing.assert_close(capped, dists.max(1).values.float(), rtol=1e-4, atol=1e-4)


def test_penultimate_features_is_the_input_of_the_last_linear(digits, digits_model):
    x = digits.x_test[:20]
    with torch.no_grad():
        got = penultimate_features(digits_model, x)
        torch.testing.assert_close(got, digits_model[:-1](x))
    assert not digits_model[-1]._forward_pre_hooks
    with pytest.raises(SafetylabError, match="no nn.Linear"):
        penultimate_features(nn.Sequential(nn.Flatten()), x)
    with pytest.raises(RuntimeError):
        penultimate_features(digits_model, torch.zeros(2, 3))  # the forward pass fails: the hook still goes
    assert not digits_model[-1]._forward_pre_hooks


@pytest.mark.parametrize("cls", [Mahalanobis, KNN])
def test_feature_detectors_fit_on_penultimate_or_given_features(cls, digits, digits_model):
    data = (digits.x_train[:300], digits.y_train[:300])
    loader = [(data[0][i:i + 64], data[1][i:i + 64]) for i in range(0, 300, 64)]
    det = cls(digits_model, batch_size=64).fit(loader)
    with torch.no_grad():
        z_train, z_test = digits_model[:-1](data[0]), digits_model[:-1](digits.x_test[:50])
    reference = cls(nn.Linear(1, 1)).fit_features(z_train, data[1])
    torch.testing.assert_close(det.score(digits.x_test[:50]), reference.score_features(z_test), rtol=1e-4, atol=1e-4)
    flat = cls(digits_model, features=lambda x: x.flatten(1)).fit(data)
    pixels = cls(nn.Linear(1, 1)).fit_features(data[0].flatten(1), data[1])
    torch.testing.assert_close(flat.score(digits.x_test[:50]), pixels.score_features(digits.x_test[:50].flatten(1)))
    with pytest.raises(SafetylabError, match=r"features\(x\) must return"):
        cls(digits_model, features=lambda x: x).fit(data)


def test_mahalanobis_preprocessing_lowers_in_distribution_scores(digits, digits_model):
    data, x = (digits.x_train, digits.y_train), digits.x_test[:100]
    grads_before = _grads(digits_model)
    plain = Mahalanobis(digits_model).fit(data).score(x)
    preprocessed = Mahalanobis(digits_model, eps=0.01).fit(data).score(x)
    assert (preprocessed < plain).float().mean() > 0.9
    assert _grads(digits_model) == grads_before


def test_detectors_keep_a_float64_models_precision(digits):
    """A float64 model gets float64 scores, equal to a float64 reference to rounding (they were cast to
    float32, so scores that differ below float32's resolution tied)."""
    torch.manual_seed(0)
    model = digits_mlp(digits.num_classes).double().eval()
    x_train, y_train = digits.x_train[:400].double(), digits.y_train[:400]
    x = digits.x_test[:40].double()
    with torch.no_grad():
        logits, z_train, z = model(x), model[:-1](x_train), model[:-1](x)
    expected = {
        "msp": -logits.softmax(1).max(1).values,
        "energy": -torch.logsumexp(logits, 1),
        "odin": -(logits / 1000).softmax(1).max(1).values,
        "mahalanobis": _naive_mahalanobis(z_train, y_train, z, 1e-6),
        "knn": torch.cdist(F.normalize(z, dim=1), F.normalize(z_train, dim=1)).sort(1).values[:, 49],
    }
    detectors = {"msp": MSP(model), "energy": Energy(model), "odin": ODIN(model, eps=0.0),
                 "mahalanobis": Mahalanobis(model), "knn": KNN(model)}
    for name, detector in detectors.items():
        got = detector.fit((x_train, y_train)).score(x)
        assert got.dtype == torch.float64, name
        torch.testing.assert_close(got, expected[name], rtol=1e-9, atol=1e-12, msg=name)
    assert Uncertainty([model, model]).score(x).dtype == torch.float64
    assert Uncertainty(model, samples=3).score(x).dtype == torch.float64


# ----------------------------------------------------------------------------- uncertainty detector
def test_uncertainty_detector_measures(digits, digits_model):
    x = digits.x_test[:30]
    same = Uncertainty([digits_model, digits_model])  # identical members: no disagreement
    torch.testing.assert_close(same.score(x), torch.zeros(30))
    # a Detector like the others: fit (nothing to learn) returns it, score is (N,) on CPU
    assert isinstance(same, Detector) and same.fit((x, digits.y_test[:30])) is same
    assert Uncertainty(digits_model, samples=2).score(x).shape == (30,)
    with torch.no_grad():
        probs = digits_model(x).softmax(1)
    torch.testing.assert_close(Uncertainty([digits_model], "entropy").score(x), predictive_entropy(probs))
    samples = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    torch.testing.assert_close(Uncertainty(digits_model).score_features(samples), torch.tensor([math.log(2)]))
    with pytest.raises(SafetylabError, match="measure"):
        Uncertainty(digits_model, measure="variance")
    with pytest.raises(SafetylabError, match="model_or_models"):
        Uncertainty([digits_model, "not a model"])


# ----------------------------------------------------------------------------- detection on the digits
def _anomalies(digits) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    checker = ((torch.arange(8)[:, None] + torch.arange(8)) % 2).float()
    return {"uniform noise": torch.rand(300, 1, 8, 8, generator=gen),
            "checkerboard": checker.expand(20, 1, 8, 8).clone(),
            "all white": torch.ones(20, 1, 8, 8),
            "held-out 8 and 9": digits.x_ood}


# AUROC (digits test images vs each set) found for the fixture's model: noise 0.93-1.0, checkerboard and all
# white 0.99-1.0 for every detector; the held-out digits 8 and 9 are near-OOD, 0.86 (Mahalanobis) to 0.98.
@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_each_detector_scores_anomalies_higher_than_digits(name, digits, digits_model):
    det = DETECTORS[name](digits_model).fit((digits.x_train, digits.y_train))
    scores_in = det.score(digits.x_test)
    assert scores_in.shape == (len(digits.x_test),) and scores_in.device.type == "cpu"
    found = {kind: auroc(scores_in, det.score(x)) for kind, x in _anomalies(digits).items()}
    assert found["uniform noise"] > 0.9, found
    assert found["checkerboard"] > 0.95 and found["all white"] > 0.95, found
    assert found["held-out 8 and 9"] > 0.75, found


def test_deep_ensemble_detector_on_the_digits(digits):
    members = train_ensemble(lambda: digits_mlp(digits.num_classes), (digits.x_train, digits.y_train),
                             ClassifierTrainConfig(epochs=5), members=3)
    anomalies = _anomalies(digits)
    for measure in Uncertainty.MEASURES:
        det = Uncertainty(members, measure).fit((digits.x_train, digits.y_train))
        assert isinstance(det, Detector) and det.fitted
        scores_in = det.score(digits.x_test)
        assert auroc(scores_in, det.score(anomalies["uniform noise"])) > 0.85, measure
        assert auroc(scores_in, det.score(anomalies["checkerboard"])) > 0.95, measure


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("cls", [Mahalanobis, KNN])
def test_unfitted_detector_says_fit_first(cls, digits, digits_model):
    det = cls(digits_model)
    with pytest.raises(SafetylabError, match=f"{cls.__name__} is not fitted: call fit"):
        det.score(digits.x_test[:5])
    with pytest.raises(SafetylabError, match=f"{cls.__name__} is not fitted: call fit"):
        det.score_features(torch.zeros(5, 128))


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_detectors_refuse_a_model_in_training_mode(name, digits, digits_model):
    model = copy.deepcopy(digits_model).train()
    with pytest.raises(SafetylabError, match="training mode"):
        DETECTORS[name](model).fit((digits.x_train[:50], digits.y_train[:50])).score(digits.x_test[:5])


def test_feature_detectors_reject_bad_features():
    with pytest.raises(SafetylabError, match="y must be a 1-D integer tensor"):
        Mahalanobis(nn.Linear(1, 1)).fit_features(torch.randn(10, 3), torch.randn(10))
    with pytest.raises(SafetylabError, match="do not vary"):
        Mahalanobis(nn.Linear(1, 1)).fit_features(torch.ones(10, 3), torch.zeros(10, dtype=torch.long))
    knn = KNN(nn.Linear(1, 1)).fit_features(torch.randn(10, 3))
    with pytest.raises(SafetylabError, match=r"\(N, d=3\)"):
        knn.score_features(torch.randn(4, 5))
    with pytest.raises(SafetylabError, match="k must be"):
        KNN(nn.Linear(1, 1), k=0)
