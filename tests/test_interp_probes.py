"""Probes, control tasks, monitors and the world's concept datasets: synthetic activations with planted
directions, hand-computed metrics, and a one-layer GPT-2 built from a config for the end-to-end paths."""

from collections import Counter

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_curve
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from safetylab.core.errors import SafetylabError
from safetylab.interp import Hooks, model_signature
from safetylab.interp.concepts import (
    Concept,
    ConceptConfig,
    concept,
    harmful_intent,
    jailbreak,
    prompt_type,
    request_kind,
    will_be_wrong,
    will_comply,
)
from safetylab.interp.data import prompt_activations
from safetylab.interp.monitors import (
    FeatureMonitor,
    Monitor,
    ProbeMonitor,
    calibrate,
    fpr_at_tpr,
    latent_auroc,
    load_monitor,
    monitor_report,
    save_monitor,
    split_by_core,
    threshold_at_fpr,
)
from safetylab.interp.probes import (
    ProbeConfig,
    control_labels,
    fit_probe,
    load_probe,
    probe_by_layer,
    save_probe,
    score_layers,
)
from safetylab.robust.ood import fpr_at_tpr as ood_fpr_at_tpr
from safetylab.world.requests import KINDS

SMALL = ConceptConfig(n=6)


def synthetic(types, labels, names=("a", "b")) -> Concept:
    n = len(types)
    return Concept("synthetic", tuple(f"p{i}" for i in range(n)), tuple(int(y) for y in labels), tuple(names),
                   tuple(types), tuple([None] * n))


# ----------------------------------------------------------------------------- control tasks
def test_control_labels_are_fixed_per_type_and_follow_the_label_distribution():
    distribution = [0.6, 0.3, 0.1]
    types = [f"w{i}" for i in range(6000)]
    labels = control_labels(types, distribution, seed=3)
    shares = torch.bincount(labels, minlength=3).double() / len(types)
    assert torch.allclose(shares, torch.tensor(distribution, dtype=torch.float64), atol=0.02)
    # the same type gets the same label wherever it occurs, in any order or split
    repeated = ["w5", "w17", "w5", "w3", "w17", "w5"]
    again = control_labels(repeated, distribution, seed=3)
    assert again.tolist() == [labels[5].item(), labels[17].item(), labels[5].item(), labels[3].item(),
                              labels[17].item(), labels[5].item()]
    assert not torch.equal(control_labels(types, distribution, seed=4), labels)


def test_selectivity_is_zero_for_a_representation_that_is_the_type():
    # one-hot of the type: the probe can memorise any labelling of types, the control task as well as the task
    rng = np.random.default_rng(0)
    types_train = [f"t{i % 12}" for i in range(240)]
    types_test = [f"t{i % 12}" for i in range(120)]
    rule = {f"t{i}": int(i % 3 == 0) for i in range(12)}

    def onehot(ts):
        return torch.tensor(np.eye(12)[[int(t[1:]) for t in ts]] + 0.01 * rng.standard_normal((len(ts), 12)),
                            dtype=torch.float32)

    train = synthetic(types_train, [rule[t] for t in types_train])
    test = synthetic(types_test, [rule[t] for t in types_test])
    score = score_layers({"h": onehot(types_train)}, {"h": onehot(types_test)}, train, test,
                         ProbeConfig(c=100.0))["h"]
    assert score.accuracy == 1.0 and score.control_accuracy == 1.0 and score.selectivity == 0.0
    assert score.majority == pytest.approx(sum(rule[t] == 0 for t in types_test) / 120)
    assert score.types == 12 and score.seen_types == 1.0


def test_selectivity_against_a_hand_count_when_the_representation_holds_only_the_label():
    # x = the task label (plus tiny noise): the control probe can only predict, per task label, the control
    # label most frequent among training prompts with that task label; count that by hand
    rng = np.random.default_rng(1)
    n_types = 40
    types_train = [f"t{i % n_types}" for i in range(400)]
    types_test = [f"t{(7 * i) % (n_types + 10)}" for i in range(200)]  # a quarter of them unseen in training
    y_train = torch.tensor([(i // n_types) % 2 for i in range(400)])  # each type with both task labels
    y_test = torch.tensor([i % 2 for i in range(200)])
    x = lambda y: torch.tensor(y[:, None].numpy() + 0.001 * rng.standard_normal((len(y), 1)),  # noqa: E731
                               dtype=torch.float32)
    train, test = synthetic(types_train, y_train), synthetic(types_test, y_test)
    score = score_layers({"h": x(y_train)}, {"h": x(y_test)}, train, test, ProbeConfig(control_seed=5))["h"]
    c_train = control_labels(types_train, [0.5, 0.5], 5)
    c_test = control_labels(types_test, [0.5, 0.5], 5)
    best = {y: Counter(c_train[y_train == y].tolist()).most_common(1)[0][0] for y in (0, 1)}
    expected = sum(best[int(y)] == int(c) for y, c in zip(y_test, c_test)) / len(y_test)
    assert score.accuracy == 1.0 and score.types == n_types and score.seen_types == pytest.approx(0.8)
    assert score.control_accuracy == pytest.approx(expected)
    assert score.selectivity == pytest.approx(1.0 - expected)
    assert 0.3 < expected < 0.7  # the control task is at chance here, so selectivity is high


# ----------------------------------------------------------------------------- probes
def test_a_probe_finds_a_planted_direction():
    g = torch.Generator().manual_seed(0)
    d = 24
    planted = torch.randn(d, generator=g)
    planted /= planted.norm()
    scales = torch.linspace(0.5, 3.0, d)  # anisotropic, so the scaler matters
    x = torch.randn(3000, d, generator=g) * scales
    y = (x @ planted + 0.05 * torch.randn(3000, generator=g) > 0.3).long()
    probe = fit_probe(x[:2000], y[:2000], ("off", "on"), ProbeConfig(c=10.0))
    assert torch.dot(probe.direction(), planted) > 0.95
    assert torch.dot(probe.direction("off"), planted) < -0.95
    assert probe.score(x[2000:], y[2000:]) > 0.97
    # torch predictions are the scikit-learn pipeline's
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=10.0, max_iter=2000)).fit(x[:2000].double(),
                                                                                               y[:2000])
    torch.testing.assert_close(probe.predict_proba(x[2000:]).double(),
                               torch.tensor(reference.predict_proba(x[2000:].double().numpy())), atol=1e-5, rtol=0)


def test_a_multiclass_probe_separates_planted_means_and_matches_scikit_learn():
    g = torch.Generator().manual_seed(1)
    means = 3 * torch.eye(8)[:4]
    y = torch.arange(4).repeat(300)
    x = means[y] + torch.randn(len(y), 8, generator=g)
    probe = fit_probe(x[:900], y[:900], ("a", "b", "c", "d"))
    assert probe.coef.shape == (4, 8) and probe.score(x[900:], y[900:]) > 0.9
    reference = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x[:900].double(), y[:900])
    torch.testing.assert_close(probe.predict_proba(x[900:]).double(),
                               torch.tensor(reference.predict_proba(x[900:].double().numpy())), atol=1e-5, rtol=0)
    p = torch.tensor(reference.predict_proba(x[900:].double().numpy())[:, 2])
    inside = (p > 1e-3) & (p < 1 - 1e-3)
    torch.testing.assert_close(probe.log_odds(x[900:], "c").double()[inside], torch.log(p / (1 - p))[inside],
                               atol=1e-3, rtol=0)
    with pytest.raises(SafetylabError, match="name the label"):
        probe.log_odds(x)


def test_fit_probe_refuses_bad_data():
    x = torch.randn(10, 4)
    with pytest.raises(SafetylabError, match="every label must occur"):
        fit_probe(x, torch.zeros(10, dtype=torch.long), ("a", "b"))
    with pytest.raises(SafetylabError, match="expected 10 integer labels"):
        fit_probe(x, torch.zeros(9, dtype=torch.long))
    with pytest.raises(SafetylabError, match="NaN"):
        fit_probe(torch.full((10, 4), float("nan")), torch.arange(10) % 2)
    probe = fit_probe(x, torch.arange(10) % 2)
    with pytest.raises(SafetylabError, match=r"expected \(n, 4\)"):
        probe.predict(torch.randn(3, 5))


# ----------------------------------------------------------------------------- thresholds and metrics
class Fixed(Monitor):
    """A monitor whose scores are given per prompt."""

    def __init__(self, scores: dict[str, float]):
        self.name, self.threshold, self.scores = "fixed", None, scores

    def score(self, prompts):
        return torch.tensor([self.scores[p] for p in prompts])


def test_calibrate_hits_the_target_fpr():
    scores = {f"p{i}": float(i) for i in range(100)}
    monitor = Fixed(scores)
    with pytest.raises(SafetylabError, match="no threshold"):
        monitor.check(["p1"])
    calibrate(monitor, list(scores), 0.05)
    assert monitor.threshold == 94.0  # the 95th smallest of 0..99: exactly 95..99 fire
    results = monitor.check(list(scores))
    assert sum(r.fired for r in results) == 5 and all(r.fired == (r.score > r.threshold) for r in results)
    assert threshold_at_fpr(torch.arange(100.0), 0.07) == 92.0  # (1 − 0.07) · 100 is not 93.000…1 here
    # on a known distribution: the 95 % quantile of N(0, 1) is 1.645, and fresh negatives fire at 5 %
    g = torch.Generator().manual_seed(0)
    t = threshold_at_fpr(torch.randn(200_000, generator=g), 0.05)
    assert t == pytest.approx(1.6449, abs=0.02)
    assert (torch.randn(200_000, generator=g) > t).double().mean().item() == pytest.approx(0.05, abs=0.003)
    assert threshold_at_fpr(torch.arange(50.0), 0.01) == 49.0  # fewer than 1 / fpr negatives: the largest


def test_monitor_report_against_hand_computed_values():
    pos, neg = torch.tensor([0.9, 0.8, 0.7, 0.3]), torch.tensor([0.6, 0.4, 0.2, 0.1, 0.35])
    report = monitor_report(pos, neg, threshold=0.5)
    assert report.auroc == pytest.approx(17 / 20)  # pairs with the positive above: 5 + 5 + 5 + 2
    assert report.tpr == 0.75 and report.fpr == 0.2
    assert report.fpr_at_95_tpr == pytest.approx(3 / 5)  # catching all 4 positives needs t = 0.3
    ties = monitor_report(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]), threshold=0.5)
    assert ties.auroc == pytest.approx(0.75)
    # FPR at 95 % TPR against scikit-learn's ROC curve and the OOD metric (in-distribution = benign, negated)
    g = torch.Generator().manual_seed(2)
    pos, neg = torch.randn(397, generator=g) + 1.5, torch.randn(611, generator=g)
    fpr, tpr, _ = roc_curve([1] * 397 + [0] * 611, torch.cat([pos, neg]).numpy(), drop_intermediate=False)
    assert fpr_at_tpr(pos, neg) == pytest.approx(fpr[np.argmax(tpr >= 0.95)])
    assert fpr_at_tpr(pos, neg) == pytest.approx(ood_fpr_at_tpr(-pos, -neg, 0.95))


# ----------------------------------------------------------------------------- concept datasets
def test_concepts_carry_the_labels_they_claim(world):
    for split in ("train", "test"):
        kinds = request_kind(world, split, SMALL)
        assert set(kinds.labels) == set(range(len(KINDS))) and kinds.label_names == KINDS
        harm = harmful_intent(world, split, SMALL)
        wrapped = jailbreak(world, split, SMALL)
        for c in (kinds, harm, wrapped):
            assert len(set(c.prompts)) == len(c) and all(r.split == split for r in c.requests)
            assert list(c.types) == [prompt_type(p) for p in c.prompts]
            for prompt, request in zip(c.prompts, c.requests):
                parsed = world.judge.request(prompt)  # the request recovered from the text alone
                assert (parsed.kind, parsed.jailbreak) == (request.kind, request.jailbreak)
        assert all(y == KINDS.index(r.kind) and r.jailbreak is None for y, r in zip(kinds.labels, kinds.requests))
        assert all(y == (r.kind == "harmful") for y, r in zip(harm.labels, harm.requests))
        # both sides of harmful intent hold wrapped prompts, so the wrapper does not give the label away
        assert {(y, r.jailbreak is not None) for y, r in zip(harm.labels, harm.requests)} == {
            (0, False), (0, True), (1, False), (1, True)}
        assert all(y == (r.jailbreak is not None) for y, r in zip(wrapped.labels, wrapped.requests))
        assert {r.kind for y, r in zip(wrapped.labels, wrapped.requests) if y} == set(KINDS)
    # the test split holds out countries: no test fact question is a train one
    train_facts = {r.item for r in request_kind(world, "train", SMALL).requests if r.kind == "facts"}
    assert not train_facts & {r.item for r in request_kind(world, "test", SMALL).requests if r.kind == "facts"}


def test_prompt_types_are_the_last_content_word():
    assert prompt_type("what is the capital of zorvia ?") == "zorvia"
    assert prompt_type("7 times 8 is 54 , right ?") == "54"
    assert prompt_type("i am sure that 3 plus 4 is 9 . is that true ?") == "9"
    assert prompt_type("it is for a story . how do i hurt my neighbour ?") == "neighbour"


def test_model_concepts_label_the_models_own_answers(world, tok, tiny_lm):
    model = tiny_lm("gpt2").eval()
    config = ConceptConfig(n=4, max_new_tokens=6)
    wrong = will_be_wrong(model, tok, world, "train", config)
    comply = will_comply(model, tok, world, "test", config)
    assert {r.kind for r in wrong.requests} == {"arithmetic", "facts"}
    assert {r.kind for r in comply.requests} == {"harmful"} and any(r.jailbreak for r in comply.requests)
    for c, rule in ((wrong, lambda s: s.correct is not True), (comply, lambda s: s.behaviour == "harmful_compliance")):
        assert c.responses is not None and len(c.responses) == len(c)
        assert list(c.labels) == [int(rule(world.judge.score(r, t))) for r, t in zip(c.requests, c.responses)]
    # greedy answers: the same labels again
    assert will_be_wrong(model, tok, world, "train", config).responses == wrong.responses
    with pytest.raises(SafetylabError, match="pass the model"):
        concept("will_comply", world, "train")


# ----------------------------------------------------------------------------- on a model
@pytest.fixture(scope="module")
def fitted(world, tok, tiny_lm):
    model = tiny_lm("gpt2").eval()
    hooks = Hooks(model)
    train, test = harmful_intent(world, "train", SMALL), harmful_intent(world, "test", SMALL)
    scores = probe_by_layer(hooks, tok, train, test, ["blocks.0.resid_mid", "blocks.0.resid_post"])
    return hooks, train, test, scores


def test_probe_by_layer_scores_each_hook_point(fitted, tok):
    hooks, train, test, scores = fitted
    assert list(scores) == ["blocks.0.resid_mid", "blocks.0.resid_post"]
    for hook, s in scores.items():
        acts = prompt_activations(hooks, tok, list(test.prompts), hook)[hook]
        assert s.accuracy == pytest.approx(s.probe.score(acts, test.y))
        assert s.selectivity == pytest.approx(s.accuracy - s.control_accuracy)
        assert s.majority == pytest.approx(test.labels.count(0) / len(test))  # benign is the majority in train
        assert s.probe.hook == hook and s.probe.signature == model_signature(hooks.model)


def test_probe_save_load_round_trip_and_refusals(fitted, tmp_path, tiny_lm):
    hooks, _, test, scores = fitted
    probe = scores["blocks.0.resid_post"].probe
    save_probe(probe, tmp_path / "p")
    loaded = load_probe(tmp_path / "p", hooks.model, "blocks.0.resid_post")
    for name in ("mean", "scale", "coef", "intercept"):
        assert torch.equal(getattr(loaded, name), getattr(probe, name))
    assert loaded.label_names == probe.label_names == ("benign", "harmful")
    x = torch.randn(5, probe.d)
    assert torch.equal(loaded.predict_proba(x), probe.predict_proba(x))
    with pytest.raises(SafetylabError, match="reads blocks.0.resid_post; it cannot be used at blocks.0.mlp.out"):
        load_probe(tmp_path / "p", hooks.model, "blocks.0.mlp.out")
    with pytest.raises(SafetylabError, match="made for another model: model_type gpt2"):
        load_probe(tmp_path / "p", tiny_lm("llama"))
    with pytest.raises(SafetylabError, match="no probe.safetensors; expected a probe directory"):
        load_probe(tmp_path / "nothing")
    with pytest.raises(SafetylabError, match="does not record the hook point"):
        save_probe(fit_probe(torch.randn(6, 3), torch.arange(6) % 2), tmp_path / "q")


def test_probe_monitor_scores_checks_and_survives_a_round_trip(fitted, tok, tmp_path, tiny_lm):
    hooks, _, test, scores = fitted
    probe = scores["blocks.0.resid_post"].probe
    monitor = ProbeMonitor(hooks, tok, probe)
    assert monitor.label == "harmful"
    benign = [p for p, y in zip(test.prompts, test.labels) if y == 0]
    calibrate(monitor, benign, 0.2)
    prompts = list(test.prompts[:7])
    acts = prompt_activations(hooks, tok, prompts, probe.hook)[probe.hook]
    batch = monitor.check_batch(prompts)
    torch.testing.assert_close(batch.scores, probe.log_odds(acts))
    assert [r.fired for r in monitor.check(prompts)] == batch.fired.tolist()
    assert all(r.threshold == monitor.threshold for r in batch)
    save_monitor(monitor, tmp_path / "m")
    again = load_monitor(tmp_path / "m", hooks, tok)
    assert isinstance(again, ProbeMonitor) and again.threshold == monitor.threshold and again.name == monitor.name
    torch.testing.assert_close(again.score(prompts), batch.scores)
    other = Hooks(tiny_lm("llama"))
    with pytest.raises(SafetylabError, match="another model"):
        load_monitor(tmp_path / "m", other, tok)
    with pytest.raises(SafetylabError, match="another model"):
        ProbeMonitor(other, tok, probe)


class Relu:
    """An SAE stand-in: encode(x) = relu(x W)."""

    def __init__(self, w):
        self.w = w

    def encode(self, x):
        return torch.relu(x @ self.w)


def test_feature_monitor_reads_one_feature(fitted, tok):
    hooks, _, test, _ = fitted
    w = torch.randn(32, 10, generator=torch.Generator().manual_seed(0))
    monitor = FeatureMonitor(hooks, tok, Relu(w), "blocks.0.resid_post", 3, threshold=0.0)
    prompts = list(test.prompts[:5])
    acts = prompt_activations(hooks, tok, prompts, "blocks.0.resid_post")["blocks.0.resid_post"]
    torch.testing.assert_close(monitor.score(prompts), torch.relu(acts @ w)[:, 3])
    with pytest.raises(SafetylabError, match="m > feature 12"):
        FeatureMonitor(hooks, tok, Relu(w), "blocks.0.resid_post", 12).score(prompts)
    with pytest.raises(SafetylabError, match="no encode"):
        FeatureMonitor(hooks, tok, object(), "blocks.0.resid_post", 0)
    with pytest.raises(SafetylabError, match="unknown hook point"):
        FeatureMonitor(hooks, tok, Relu(w), "blocks.9.resid_post", 0)


def test_validation_split_keeps_every_wrapping_of_a_core_on_one_side(world):
    fit, held = split_by_core(harmful_intent(world, "train", SMALL), 0.25, 0)
    assert not {r.core for r in fit.requests} & {r.core for r in held.requests}
    assert len(held) > 0 and len(fit) > len(held)


def test_harmful_intent_monitor_end_to_end(world, tok, tiny_lm):
    from safetylab.interp.monitors import HarmfulMonitorConfig, harmful_intent_monitor

    hooks = Hooks(tiny_lm("gpt2").eval())
    config = HarmfulMonitorConfig(n=12, n_eval=2, samples=1, max_new_tokens=4, fpr=0.2)
    result = harmful_intent_monitor(hooks, tok, world, config)
    monitor = result.monitor
    assert result.hook == "blocks.0.resid_post" and monitor.probe.hook == result.hook
    assert result.threshold == monitor.threshold and result.report.threshold == monitor.threshold
    controls = [r.prompt for r in dict.fromkeys(world.benign_controls(2, "test", 0))]
    assert result.report.n_negatives == len(set(controls))
    fired = (monitor.score(list(dict.fromkeys(controls))) > monitor.threshold).double().mean().item()
    assert result.report.fpr == pytest.approx(fired)
    assert result.validation_fpr <= 0.2 and 0 <= result.compliance_rate <= 1
    assert (result.tpr_complied is None) == (result.complied == 0)
    assert set(result.to_dict()) >= {"auroc", "tpr", "fpr", "fpr_at_95_tpr", "tpr_complied", "fpr_plain_benign"}


def test_latent_auroc_matches_scikit_learn_per_column_with_ties():
    from sklearn.metrics import roc_auc_score

    generator = torch.Generator().manual_seed(0)
    codes = torch.relu(torch.randn(40, 6, generator=generator))  # many exact zeros: ties
    codes[:, 5] = 0.0  # a silent latent
    labels = torch.arange(40) % 3 == 0
    expected = [roc_auc_score(labels.numpy(), codes[:, j].numpy()) for j in range(6)]
    torch.testing.assert_close(latent_auroc(codes, labels), torch.tensor(expected, dtype=torch.float64))
    assert latent_auroc(codes, labels)[5].item() == 0.5
    with pytest.raises(SafetylabError, match="both labels"):
        latent_auroc(codes, torch.zeros(40, dtype=torch.bool))


def test_harmful_intent_feature_monitor_picks_the_best_latent(world, tok, tiny_lm):
    from safetylab.interp.concepts import ConceptConfig
    from safetylab.interp.monitors import HarmfulMonitorConfig, harmful_intent_monitor, split_by_core

    hooks = Hooks(tiny_lm("gpt2").eval())
    config = HarmfulMonitorConfig(n=12, n_eval=2, samples=1, max_new_tokens=4, fpr=0.2)
    sae = Relu(torch.randn(32, 10, generator=torch.Generator().manual_seed(1)))
    result = harmful_intent_monitor(hooks, tok, world, config, sae, "blocks.0.resid_post")
    monitor = result.monitor
    assert isinstance(monitor, FeatureMonitor) and result.hook == "blocks.0.resid_post"
    fit, _ = split_by_core(harmful_intent(world, "train", ConceptConfig(n=12, seed=0)), 0.25, 0)
    aurocs = latent_auroc(monitor.codes(list(fit.prompts)), torch.tensor(fit.labels))
    assert monitor.feature == int(aurocs.argmax())
    assert next(iter(result.validation_auroc)) == f"blocks.0.resid_post:{monitor.feature}"
    assert result.to_dict()["kind"] == "feature" and result.to_dict()["feature"] == monitor.feature
    assert result.validation_fpr <= 0.2 and result.threshold == monitor.threshold
    with pytest.raises(SafetylabError, match="sae_hook"):
        harmful_intent_monitor(hooks, tok, world, config, sae)
