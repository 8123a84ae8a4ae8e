"""safetylab.align.evaluate (summarize, evaluate_policy) and safetylab.audit (studies, report, CLI config)."""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, replace

import pytest
import torch
from filelock import FileLock
from test_cli import run_main

import safetylab.audit.run as audit_run
from safetylab.agents.envs import ENVIRONMENTS
from safetylab.align import study as align_study
from safetylab.align.evaluate import METRICS, EvalConfig, evaluate_policy, summarize
from safetylab.audit import STUDIES, StudyPart, audit_config, run_audit
from safetylab.audit.report import build_report, write_report
from safetylab.core.config import config_to_dict
from safetylab.core.runs import RunDir
from safetylab.core.study import Context, Section, Stage, Table, run_stages
from safetylab.models import ModelConfig, build_model, train_tokenizer
from safetylab.world import KINDS
from safetylab.world.content import JAILBREAKS


# ============================================================================ evals: summarize
def record(kind: str, behaviour: str, utility: float, correct=None, jailbreak=None, **extra) -> dict:
    return {"kind": kind, "behaviour": behaviour, "utility": utility, "correct": correct, "jailbreak": jailbreak,
            **extra}


RECORDS = [
    record("harmful", "harmful_compliance", -2.0),
    record("harmful", "refusal", 0.6),
    record("harmful", "harmful_compliance", -2.0, jailbreak="roleplay"),
    record("harmful", "harmful_compliance", -2.0, jailbreak="story"),
    record("harmful", "refusal_alternative", 1.0, jailbreak="story"),
    record("arithmetic", "correct", 1.0, correct=True),
    record("arithmetic", "over_refusal", -0.3),  # no answer: counts as not correct
    record("facts", "confident_wrong", -1.0, correct=False),
    record("false_premise", "sycophantic", -1.0, correct=False),
    record("false_premise", "correction", 1.0, correct=True),
    record("dual_use", "over_refusal", -0.3),
    record("advice", "hedged_correct", 0.6, correct=True),
]


def test_summarize_hand_computed_rates():
    s = summarize(RECORDS)
    assert s["n"] == 12
    plain = [r for r in RECORDS if r["jailbreak"] is None]
    assert s["gold_utility"] == pytest.approx(sum(r["utility"] for r in plain) / len(plain), abs=1e-6)
    assert s["harmful_compliance"] == pytest.approx(1 / 2)  # 2 plain harmful, 1 complied
    assert s["jailbreak_success"] == pytest.approx(2 / 3)  # 3 jailbroken harmful, 2 complied
    assert s["over_refusal"] == pytest.approx(2 / 7, abs=1e-6)  # 7 non-harmful, 2 refused
    assert s["accuracy"] == pytest.approx(3 / 6)  # arithmetic×2, facts, false_premise×2, advice
    assert s["confident_wrong"] == pytest.approx(1 / 4)  # arithmetic×2, facts, advice
    assert s["sycophancy"] == pytest.approx(1 / 2)
    assert s["kl_to_reference"] is None
    assert set(s) == {"n", *METRICS}


def test_summarize_none_where_nothing_applies():
    empty = summarize([])
    assert empty["n"] == 0
    assert all(empty[m] is None for m in METRICS)

    benign = summarize([record("arithmetic", "correct", 1.0, correct=True),
                        record("facts", "evasive", -0.4)])
    assert benign["harmful_compliance"] is None
    assert benign["jailbreak_success"] is None
    assert benign["sycophancy"] is None
    assert benign["accuracy"] == pytest.approx(0.5)
    assert benign["over_refusal"] == 0.0

    harmful = summarize([record("harmful", "refusal", 0.6)])
    assert harmful["harmful_compliance"] == 0.0
    assert harmful["jailbreak_success"] is None
    assert harmful["over_refusal"] is None and harmful["accuracy"] is None
    assert harmful["confident_wrong"] is None


def test_summarize_only_jailbroken_records():
    s = summarize([record("harmful", "harmful_compliance", -2.0, jailbreak="x"),
                   record("harmful", "refusal", 0.6, jailbreak="y")])
    assert s["jailbreak_success"] == 0.5
    assert s["harmful_compliance"] is None
    assert s["gold_utility"] == pytest.approx(-0.7)  # no plain records: the mean over all


def test_summarize_kl_mean_over_records_with_kl():
    rows = [record("facts", "correct", 1.0, correct=True, kl=0.2),
            record("facts", "correct", 1.0, correct=True, kl=0.4),
            record("facts", "correct", 1.0, correct=True)]
    assert summarize(rows)["kl_to_reference"] == pytest.approx(0.3)


# ============================================================================ evals: evaluate_policy
@pytest.fixture(scope="module")
def tiny_policy(world):
    tok = train_tokenizer(world.corpus(150))
    torch.manual_seed(0)
    return build_model(ModelConfig(n_layer=1, n_head=2, n_embd=32), tok).eval(), tok


def test_evaluate_policy_by_kind(world, tiny_policy):
    model, tok = tiny_policy
    config = EvalConfig(per_kind=2, jailbroken=1, max_new_tokens=8)
    requests = world.evaluation_set(config.per_kind, config.jailbroken)
    torch.manual_seed(0)
    result = evaluate_policy(model, tok, world.judge, requests, reference=model, config=config)
    assert set(result["by_kind"]) == {*KINDS, "jailbroken"}
    for kind in KINDS:
        assert result["by_kind"][kind]["n"] == 2
    assert result["by_kind"]["jailbroken"]["n"] == len(JAILBREAKS)
    assert result["overall"]["n"] == len(requests) == len(result["samples"])
    for request, sample in zip(requests, result["samples"]):
        assert sample["prompt"] == request.prompt
        assert sample["kind"] == request.kind
        assert sample["jailbreak"] == request.jailbreak
        assert isinstance(sample["response"], str)
        assert abs(sample["kl"]) < 1e-4
    assert abs(result["overall"]["kl_to_reference"]) < 1e-4
    # by_kind is summarize over that kind's plain records
    facts = [s for s in result["samples"] if s["kind"] == "facts" and not s["jailbreak"]]
    assert result["by_kind"]["facts"] == summarize(facts)
    assert result["by_kind"]["harmful"]["jailbreak_success"] is None
    assert result["by_kind"]["jailbroken"]["harmful_compliance"] is None


def test_evaluate_policy_without_reference_and_other_reference(world, tiny_policy):
    model, tok = tiny_policy
    config = EvalConfig(per_kind=1, jailbroken=1, max_new_tokens=6)
    requests = world.evaluation_set(config.per_kind, config.jailbroken)
    torch.manual_seed(0)
    plain = evaluate_policy(model, tok, world.judge, requests, config=config)
    assert plain["overall"]["kl_to_reference"] is None
    assert all("kl" not in s for s in plain["samples"])
    torch.manual_seed(1)
    other = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=32), tok).eval()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    torch.manual_seed(0)
    against = evaluate_policy(model, tok, world.judge, requests, reference=other, config=config)
    assert [s["response"] for s in against["samples"]] == [s["response"] for s in plain["samples"]]
    assert against["overall"]["kl_to_reference"] > 0


# ============================================================================ audit
def tiny_audit_config(seed: int = 0):
    config = audit_config(quick=True, seed=seed, device="cpu")
    a = config.align
    tiny = replace(
        a, corpus_conversations=150, demonstrations=60, labeler_pairs=40,
        model=ModelConfig(n_layer=1, n_head=2, n_embd=32, n_positions=96),
        base=replace(a.base, steps=12, batch_size=8, warmup_steps=2, log_every=4, checkpoint_every=8),
        sft=replace(a.sft, steps=8, batch_size=8, warmup_steps=2, log_every=4, checkpoint_every=8),
        eval=EvalConfig(per_kind=2, jailbroken=1, max_new_tokens=10),
        preferences=40, best_of_n=(1, 2), best_of_n_per_kind=1, kl_samples=2,
        reward=replace(a.reward, train=replace(a.reward.train, steps=4, batch_size=8, log_every=2, checkpoint_every=2)),
        dpo=replace(a.dpo, train=replace(a.dpo.train, steps=4, batch_size=8, log_every=2, checkpoint_every=2)),
        rl_prompts_per_kind=2,
        ppo=replace(a.ppo, max_new_tokens=8, train=replace(a.ppo.train, steps=8, batch_size=4, log_every=4,
                                                           checkpoint_every=4)),
    )
    return replace(
        config, align=tiny,
        robust=replace(config.robust, standard=replace(config.robust.standard, epochs=2),
                       adversarial=(replace(config.robust.adversarial[0], epochs=1, steps=2),), eps=(0.0, 0.1),
                       attack_steps=5, square_queries=20, ensemble_members=2, mc_samples=3),
        interp=replace(config.interp, lens_questions=10, concepts=("request_kind", "will_comply"),
                       concept=replace(config.interp.concept, n=8, max_new_tokens=8),
                       sae=replace(config.interp.sae, steps=20, batch_size=256), sae_corpus=100, sae_demonstrations=50,
                       dashboard_features=3,
                       steering=replace(config.interp.steering, n_direction=8, n_validation=6, n_harmful=6,
                                        jailbroken=1, per_kind=3, max_new_tokens=8),
                       patching=replace(config.interp.patching, n_pairs=4, known_only=False, heads=False),
                       monitor=replace(config.interp.monitor, n=40, n_eval=5, samples=1, max_new_tokens=8)),
        agents=replace(config.agents, episodes=60),
        control=replace(config.control, guard=replace(config.control.guard, n=40, responses=200), per_kind=4,
                        wrapped=1, max_new_tokens=8),
        evals=replace(config.evals, per_kind=2, jailbroken=1, controls=1, redteam_n=2, per_tier=2, payload_n=4,
                      max_new_tokens=8),
        verify=replace(config.verify, trainings=("standard",), standard=replace(config.verify.standard, epochs=1),
                       eps=(0.0, 0.05), examples=8, exact_time_limit=0.2, attack_steps=3, alpha_iterations=2,
                       sigmas=(0.25,), smooth_epochs=1, smooth_examples=4, smooth_n=100, radii=(0.0, 0.25)),
    )


CONFIG = tiny_audit_config()
SECTION_NAMES = [f"{study.name}/{stage.name}" for study in STUDIES for stage in study.stages]


def tiny_audit(root, seed: int):
    """One tiny audit per seed for the whole session, shared by the xdist workers (a file lock makes the
    first one run it). Tests that write into an audit directory work on a copy."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's directory, common to all workers
    path = root / f"safetylab-tiny-audit-{seed}"
    with FileLock(str(root / f"safetylab-tiny-audit-{seed}.lock")):
        if not (path / "report.json").exists():
            logs: list[str] = []
            run_audit(tiny_audit_config(seed), path, log=logs.append)
            (root / f"safetylab-tiny-audit-{seed}.log").write_text("\n".join(logs) + "\n")
    return path


@pytest.fixture(scope="session")
def audit_dir(tmp_path_factory):
    return tiny_audit(tmp_path_factory.getbasetemp(), 0)


@pytest.fixture
def audit_copy(audit_dir, tmp_path):
    path = tmp_path / "audit"
    shutil.copytree(audit_dir, path)
    return path


@pytest.fixture(scope="session")
def report(audit_dir) -> dict:
    return json.loads((audit_dir / "report.json").read_text(encoding="utf-8"))


def sections_of(report: dict) -> dict[str, dict]:
    return {s["name"]: s for s in report["sections"]}


def test_tiny_config_is_tiny():
    assert CONFIG.align.base.steps == 12 and CONFIG.align.model.n_layer == 1
    assert CONFIG.align.world.seed == CONFIG.seed == 0


def test_audit_composes_every_study_on_its_seed():
    config = audit_config(quick=True, seed=3)
    assert config.align.seed == config.robust.seed == config.agents.seed == config.verify.seed == 3
    assert config.align.world.seed == config.align.base.seed == config.align.ppo.train.seed == 3
    assert config.interp.seed == config.interp.world.seed == 3
    assert [s.name for s in STUDIES] == ["align", "interp", "robust", "agents", "verify", "control", "evals"]
    assert config.evals.seed == config.evals.world.seed == 3


@pytest.mark.slow
def test_audit_writes_both_reports(audit_dir, report):
    assert (audit_dir / "report.html").is_file()
    logs = (audit_dir.parent / "safetylab-tiny-audit-0.log").read_text().splitlines()
    for name in SECTION_NAMES:  # the first run ran every stage: a start line and a timed end line each
        assert sum(line.startswith(f"== {name}: ") for line in logs) == 2, name
    assert not any("skipped" in line for line in logs)
    assert [s["name"] for s in report["sections"]] == SECTION_NAMES
    assert [s["name"] for s in report["studies"]] == [s.name for s in STUDIES]
    assert report["config"] == json.loads(json.dumps(asdict(CONFIG)))
    assert report["safetylab"]
    for section in report["sections"]:
        assert {"title", "summary", "tables", "plots", "transcripts", "data"} <= set(section)
        assert section["summary"]
        for table in section["tables"]:
            assert table["rows"]
            assert all(len(row) == len(table["columns"]) for row in table["rows"])
        for plot in section["plots"]:
            assert (audit_dir / plot).is_file()
        assert (audit_dir / section["name"] / "section.json").is_file()


@pytest.mark.slow
def test_audit_html_is_self_contained(audit_dir, report):
    html = (audit_dir / "report.html").read_text(encoding="utf-8")
    for section in report["sections"]:
        assert section["title"] in html
    for study in STUDIES:
        assert study.title in html
    plots = sum(len(s["plots"]) for s in report["sections"])
    assert plots >= 10
    assert html.count("data:image/png;base64,") == plots
    assert 'src="align/' not in html


@pytest.mark.slow
def test_audit_world_section(report):
    world = sections_of(report)["align/world"]
    assert [row[0] for row in world["tables"][0]["rows"]] == ["ideal", "careful", "typical"]
    ideal = world["tables"][0]["rows"][0]
    assert ideal[1] == 1.0  # the ideal labeler always agrees with the gold judge


@pytest.mark.slow
def test_audit_training_sections(audit_dir, report):
    sections = sections_of(report)
    for name, steps in (("base", CONFIG.align.base.steps), ("sft", CONFIG.align.sft.steps)):
        model = audit_dir / "align" / sections[f"align/{name}"]["data"]["model"]  # relative to its study's run
        assert list(model.glob("*.safetensors"))
        lines = (audit_dir / "align" / name / "metrics.jsonl").read_text().splitlines()
        metrics = [json.loads(line) for line in lines]
        assert metrics[-1]["step"] == steps
        assert sections[f"align/{name}"]["data"]["final_loss"] == metrics[-1]["loss"]


@pytest.mark.slow
def test_audit_evaluate_tables_rows(report):
    evaluate = sections_of(report)["align/evaluate"]
    assert len(evaluate["tables"]) == 2  # base and sft
    expected = {kind: CONFIG.align.eval.per_kind for kind in KINDS}
    expected["jailbroken"] = CONFIG.align.eval.jailbroken * len(JAILBREAKS)
    for table in evaluate["tables"]:
        assert table["columns"] == ["kind", "n", *METRICS]
        assert [row[0] for row in table["rows"]] == [*KINDS, "jailbroken", "all"]
        counts = {row[0]: row[1] for row in table["rows"]}
        for kind, n in expected.items():
            assert counts[kind] == n
        assert counts["all"] == sum(expected.values())
    base, sft = evaluate["tables"]
    assert base["rows"][-1][-1] is None  # the base model has no reference
    assert sft["rows"][-1][-1] > 0  # KL(SFT ‖ base) after fine-tuning
    assert {t["model"] for t in evaluate["transcripts"]} == {"base", "sft"}
    assert {t["kind"] for t in evaluate["transcripts"]} == set(KINDS)


@pytest.mark.slow
def test_audit_rerun_skips_finished_stages(audit_copy):
    before = {p: p.read_bytes() for p in audit_copy.rglob("section.json")}
    logs: list[str] = []
    sections = run_audit(CONFIG, audit_copy, log=logs.append)
    assert list(sections) == SECTION_NAMES
    assert len(logs) == len(SECTION_NAMES)
    for name, line in zip(SECTION_NAMES, logs):
        assert name in line and "skipped" in line
    assert {p: p.read_bytes() for p in audit_copy.rglob("section.json")} == before
    report = json.loads((audit_copy / "report.json").read_text())
    assert [s["name"] for s in report["sections"]] == SECTION_NAMES


@pytest.mark.slow
def test_audit_other_config_in_same_directory_is_refused(audit_copy):
    from safetylab.core.errors import SafetylabError

    with pytest.raises(SafetylabError, match="labeler_pairs"):
        run_audit(replace(CONFIG, align=replace(CONFIG.align, labeler_pairs=41)), audit_copy, log=lambda s: None)


@pytest.mark.slow
def test_another_seed_changes_every_stage(tmp_path_factory, report):
    """``audit --seed 3`` reaches every study: no stage repeats seed 0's numbers."""
    other = json.loads((tiny_audit(tmp_path_factory.getbasetemp(), 3) / "report.json").read_text())
    assert other["config"]["seed"] == 3
    for mine, theirs in zip(report["sections"], other["sections"]):
        assert mine["name"] == theirs["name"]
        assert mine["tables"] != theirs["tables"] or mine["data"] != theirs["data"], mine["name"]
        if mine["name"] not in ("align/world",):  # the world's probe table counts variants: same counts
            assert mine["data"] != theirs["data"], mine["name"]


def test_failing_stage_leaves_no_section_and_no_report(tmp_path, monkeypatch):
    calls = []

    def flaky(ctx: Context) -> Section:
        out = ctx.stage_dir("flaky")
        (out / "partial.txt").write_text("half done")
        calls.append(ctx.sections["world"].title)
        if len(calls) == 1:
            raise RuntimeError("stage failed midway")
        return Section(title="Flaky", summary="worked the second time", tables=[Table("t", ["a"], [[1]])])

    only = (StudyPart("align", "Alignment", (align_study.STAGES[0], Stage("flaky", "fails once", flaky)),
                      lambda c: c.align),)
    monkeypatch.setattr(audit_run, "STUDIES", only)
    out = tmp_path / "audit"
    with pytest.raises(RuntimeError, match="midway"):
        run_audit(CONFIG, out, log=lambda s: None)
    assert (out / "align" / "world" / "section.json").is_file()
    assert (out / "align" / "flaky" / "partial.txt").is_file()
    assert not (out / "align" / "flaky" / "section.json").exists()
    assert not (out / "report.json").exists() and not (out / "report.html").exists()

    logs: list[str] = []
    run_audit(CONFIG, out, log=logs.append)
    assert "align/world" in logs[0] and "skipped" in logs[0]
    assert not any("flaky" in line and "skipped" in line for line in logs)
    assert calls == ["The assistant world", "The assistant world"]  # the world section was reloaded
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["sections"]] == ["align/world", "align/flaky"]


@pytest.mark.slow
def test_a_custom_stage_is_a_local_addition(audit_copy):
    def kl_summary(ctx: Context) -> Section:
        kl = ctx.sections["evaluate"].data["overall"]["sft"]["kl_to_reference"]
        (ctx.stage_dir("custom") / "note.txt").write_text(f"{kl}")
        return Section(title="Custom check", summary=f"KL {kl:.3f}",
                       tables=[Table("KL", ["model", "kl"], [["sft", kl]])], data={"kl": kl})

    ctx = Context(CONFIG.align, RunDir(audit_copy / "align", config_to_dict(CONFIG.align)))
    logs: list[str] = []
    sections = run_stages([*align_study.STAGES, Stage("custom", "a custom check", kl_summary)], ctx, log=logs.append)
    assert list(sections) == [*(s.name for s in align_study.STAGES), "custom"]
    assert sum("skipped" in line for line in logs) == len(align_study.STAGES)
    assert sections["custom"].data["kl"] > 0
    assert (audit_copy / "align" / "custom" / "section.json").is_file()
    write_report(audit_copy, build_report(CONFIG, {f"align/{k}": v.moved("align") for k, v in sections.items()},
                                           {"align": "A"}))
    report = json.loads((audit_copy / "report.json").read_text())
    custom = report["sections"][-1]
    assert custom["name"] == "align/custom" and custom["tables"][0]["rows"] == [["sft", sections["custom"].data["kl"]]]
    assert "Custom check" in (audit_copy / "report.html").read_text()


# ============================================================================ audit CLI config
@pytest.mark.parametrize("text,names", [
    ("bogus_key: 1\n", ["bogus_key"]),
    ("align:\n  base:\n    stepz: 5\n", ["stepz", "base"]),
    ('{"align": {"eval": {"per_kind": 2, "nonsense": true}}}\n', ["nonsense", "eval"]),
    ("seed: not-a-number\n", ["seed"]),
])
def test_audit_config_file_errors(monkeypatch, capsys, tmp_path, text, names):
    config = tmp_path / "audit.yaml"
    config.write_text(text)
    out_dir = tmp_path / "run"
    code, out, err = run_main(monkeypatch, capsys, "audit", "--config", str(config), "--out", str(out_dir))
    assert code == 2
    assert err.startswith("error: ") and str(config) in err
    for name in names:
        assert name in err
    assert "Traceback" not in err
    assert not out_dir.exists()  # nothing started


def test_audit_config_file_overrides_merge(monkeypatch, capsys, tmp_path):
    import safetylab.audit as audit_package

    seen = {}

    def fake_run_audit(config, out, log=print):
        seen["config"], seen["out"] = config, out
        return {}

    monkeypatch.setattr(audit_package, "run_audit", fake_run_audit)
    config = tmp_path / "audit.yaml"
    config.write_text("align:\n  base:\n    steps: 7\n  eval:\n    per_kind: 2\n  labeler_pairs: 30\n")
    code, out, err = run_main(monkeypatch, capsys, "audit", "--quick", "--seed", "3", "--device", "cpu",
                              "--config", str(config), "--out", str(tmp_path / "run"))
    assert code == 0, err
    chosen = seen["config"]
    quick = audit_config(quick=True, seed=3, device="cpu")
    a = quick.align
    assert chosen == replace(quick, align=replace(a, base=replace(a.base, steps=7), eval=replace(a.eval, per_kind=2),
                                                  labeler_pairs=30))
    assert chosen.align.base.seed == 3 and chosen.align.world.seed == 3
    assert seen["out"] == tmp_path / "run"
    assert "report:" in out


@pytest.mark.slow
def test_audit_align_sections(audit_dir, report):
    sections = sections_of(report)
    reward = sections["align/reward"]["tables"][0]
    assert reward["columns"] == ["comparisons of", "pairs", "accuracy", "margin", "gold agreement"]
    assert 0.0 <= reward["rows"][0][2] <= 1.0
    curve = sections["align/best-of-n"]["tables"][0]
    assert [row[0] for row in curve["rows"]] == [1, 2]
    bound = curve["columns"].index("kl_bound")
    assert curve["rows"][0][bound] == 0.0 and curve["rows"][1][bound] > 0
    policies = sections["align/policies"]
    table = policies["tables"][0]
    assert [row[0] for row in table["rows"]] == ["sft", "dpo", "ppo"]
    assert table["rows"][0][table["columns"].index("kl_to_reference")] == 0.0  # SFT is the reference here
    assert table["columns"][:4] == ["model", "proxy_reward", "gold_gain", "gold_utility"]
    for name in ("dpo", "ppo"):
        overall = policies["data"]["overall"][name]
        assert overall["kl_to_reference"] > 0  # each moved the policy away from SFT
        assert overall["gold_gain"] == pytest.approx(overall["gold_utility"] - policies["data"]["overall"]["sft"][
            "gold_utility"])
        assert (audit_dir / "align" / policies["data"]["models"][name] / "model.safetensors").is_file()
    assert all(math.isfinite(row[1]) for row in table["rows"])  # the reward model's score of each


@pytest.mark.slow
def test_audit_robust_sections(audit_dir, report):
    sections = sections_of(report)
    robust = [s for s in report["sections"] if s["study"] == "robust"]
    assert [s["name"] for s in robust] == ["robust/attack", "robust/calibrate", "robust/ood", "robust/shift",
                                           "robust/selective"]
    attack = sections["robust/attack"]["data"]["rows"]
    assert [r["eps"] for r in attack] == [0.0, 0.1, 0.0, 0.1]  # standard, then the PGD-trained model
    for row in attack:
        assert row["ensemble"] <= min(row["fgsm"], row["pgd"]) <= row["clean"]
    ood = sections["robust/ood"]["data"]["rows"]
    assert {r["detector"] for r in ood} == set(CONFIG.robust.detectors)
    assert all(0.0 <= r["auroc"] <= 1.0 for r in ood)
    plots = [p for s in robust for p in s["plots"]]
    assert len(plots) == 6 and all((audit_dir / p).is_file() for p in plots)


@pytest.mark.slow
def test_audit_interp_sections_study_the_align_sft_model(audit_dir, report):
    sections = sections_of(report)
    model = sections["interp/model"]
    assert model["summary"].endswith("handed in")
    assert (audit_dir / model["data"]["model"]).resolve() == (audit_dir / "align/sft/artifacts/model").resolve()
    assert model["data"]["signature"]["n_layers"] == CONFIG.align.model.n_layer
    lens = sections["interp/lens"]["data"]["facts"]
    assert len(lens["prob"]) == CONFIG.align.model.n_layer + 1 and all(0 <= p <= 1 for p in lens["prob"])
    assert all((audit_dir / p).is_file() for s in sections for p in sections[s]["plots"] if s.startswith("interp/"))
    sae = sections["interp/sae"]["data"]
    assert sae["hook"] == "blocks.0.resid_post" and (audit_dir / "interp" / sae["dashboard"]).is_file()
    assert 0 <= sae["topk"]["metrics"]["l0"] <= CONFIG.interp.sae.k
    steer = {r["condition"]: r for r in sections["interp/steer"]["data"]["conditions"]}
    assert set(steer) == {"none", "ablation", "addition"} and steer["none"]["kl_per_token"] == 0
    monitor = sections["interp/monitor"]["data"]
    assert 0 <= monitor["auroc"] <= 1 and (audit_dir / "interp" / monitor["monitor"] / "monitor.json").is_file()
    feature = monitor["feature"]  # the SAE latent monitor, on the audit's one SAE
    assert feature["kind"] == "feature" and feature["hook"] == sae["hook"] and feature["feature"] >= 0
    assert (audit_dir / "interp" / feature["monitor"] / "sae" / "sae.safetensors").is_file()


@pytest.mark.slow
def test_audit_control_sections_guard_the_align_sft_model_with_the_interp_monitor(audit_dir, report):
    from safetylab.control.config import read_guard

    sections = sections_of(report)
    assert sections["control/model"]["summary"].endswith("handed in")
    guard = sections["control/guard"]["data"]
    spec = read_guard(audit_dir / "control" / guard["guard"])
    assert [kind for kind, _ in spec.input] == ["rules", "classifier", "ood", "monitor"]
    assert guard["monitor"].endswith("interp/monitor/harmful-intent")
    calibration = guard["calibration"]["input_classifier"]
    assert calibration["block"]["fpr"] <= calibration["fpr_block"] + 1e-9
    evaluation = sections["control/evaluate"]["data"]
    assert set(evaluation) >= {"harmful", "jailbroken", "benign", "benign wrapped", "summary", "latency_ms"}
    summary = evaluation["summary"]
    assert summary["harmful_compliance_guarded"] <= summary["harmful_compliance_alone"]
    assert evaluation["harmful"]["blocked"] + evaluation["harmful"]["escalated"] <= 1
    base = evaluation["base"]["summary"]  # the align base model, behind the text layers
    assert base["harmful_compliance_guarded"] <= base["harmful_compliance_alone"]
    assert "The base model" in sections["control/evaluate"]["tables"][1]["title"]


@pytest.mark.slow
def test_audit_evals_sections_evaluate_the_align_models_and_attack_the_guard(audit_dir, report):
    from inspect_ai.log import read_eval_log

    sections = sections_of(report)
    models = sections["evals/models"]["data"]["models"]
    assert set(models) >= {"base", "sft"} and sections["evals/models"]["summary"].endswith("handed in")
    safety = sections["evals/safety"]["data"]
    assert set(safety["metrics"]) == set(models)
    for name, log in safety["logs"].items():
        assert read_eval_log(str(audit_dir / "evals" / log)).status == "success", name
    redteam = sections["evals/redteam"]["data"]
    assert "sft+guard" in redteam["logs"]  # the control study's guard, its text layers around the SFT model
    assert (audit_dir / "evals" / "redteam" / "successful-sft-guard.jsonl").is_file()
    payload = sections["evals/capabilities"]["data"]["payload_knowledge"]
    assert set(payload) == set(models) and all(0 <= p["value"] <= 1 for p in payload.values())
    assert "evals/attacker" not in sections  # minutes of training: `evals report --attacker`


@pytest.mark.slow
def test_audit_agents_section(audit_dir, report):
    grid = sections_of(report)["agents/gridworlds"]
    rows = grid["data"]["rows"]
    assert {r["environment"] for r in rows} == set(ENVIRONMENTS)
    assert {(r["agent"], r["mitigation"]) for r in rows if r["environment"] == "IslandNavigation"} == {
        ("q-learning", "none"), ("q-learning", "shield"), ("sarsa", "none"), ("sarsa", "shield")}
    assert all(r["unsafe"] == 0 for r in rows if r["mitigation"] == "shield")
    assert all((audit_dir / p).is_file() for p in grid["plots"])


@pytest.mark.slow
def test_audit_verify_sections(audit_dir, report):
    sections = sections_of(report)
    rows = sections["verify/certify"]["data"]["rows"]
    assert [(r["model"], r["eps"]) for r in rows] == [("standard", 0.0), ("standard", 0.05)]
    for r in rows:
        assert r["crown"] <= r["exact"] + 1e-6 and r["exact"] <= r["pgd"] + 1e-6
    assert {r["method"] for r in sections["verify/bounds"]["data"]["rows"]} == {"ibp", "crown", "alpha-crown"}
    assert set(sections["verify/smooth"]["data"]["curves"]) == {"smoothing σ=0.25", "CROWN (standard network)"}
    plots = [p for name in ("verify/certify", "verify/smooth") for p in sections[name]["plots"]]
    assert len(plots) == 2 and all((audit_dir / p).is_file() for p in plots)


@pytest.mark.slow
def test_align_study_from_a_given_sft_with_on_policy_comparisons_and_every_method(audit_dir, tmp_path):
    """`safetylab align report --sft DIR --preset ideal`-style: the reward, best-of-n and policies stages from
    an SFT model handed in, the labeler comparing the SFT model's own samples, DPO, RPO, PPO and RLOO."""
    from safetylab.core.study import run_study

    a = CONFIG.align
    config = replace(a, labeler="ideal", on_policy_per_kind=1, on_policy_samples=3, methods=align_study.METHODS,
                     rloo=replace(a.rloo, max_new_tokens=8, train=replace(a.rloo.train, steps=2, batch_size=4,
                                                                          log_every=1, checkpoint_every=2)))
    sft = audit_dir / "align" / "sft" / "artifacts" / "model"
    sections = run_study(align_study.STAGES, config, tmp_path / "align", only=align_study.FROM_SFT,
                         inputs={"sft": str(sft)}, log=lambda line: None)
    assert list(sections) == ["reward", "best-of-n", "policies"]
    reward = sections["reward"]
    assert [row[0] for row in reward.tables[0].rows] == ["written styles", "SFT samples"]
    assert reward.data["pairs"]["sampled"] >= 1
    sampled = (tmp_path / "align" / "reward" / "sampled-train.jsonl").read_text().splitlines()
    assert len(sampled) == reward.data["pairs"]["sampled"]
    table = sections["policies"].tables[0]
    assert [row[0] for row in table.rows] == ["sft", "dpo", "rpo", "ppo", "rloo"]
    assert "on-policy comparisons" in table.title
    for name in align_study.METHODS:
        assert (tmp_path / "align" / sections["policies"].data["models"][name] / "model.safetensors").is_file()
    config_json = json.loads((tmp_path / "align" / "config.json").read_text())
    assert config_json["inputs"] == {"sft": str(sft)}


def test_one_root_seed_per_audit(monkeypatch, capsys, tmp_path):
    """A config file's top-level seed and device reach every study; a hand-built config whose studies
    disagree with its seed is refused."""
    from safetylab.audit import AuditConfig, with_seed
    from safetylab.cli.audit import _config
    from safetylab.core.errors import ConfigError

    path = tmp_path / "audit.yaml"
    path.write_text("seed: 5\ndevice: cpu\n")
    config = _config(True, 0, "auto", path)
    assert config.seed == config.align.seed == config.align.world.seed == config.align.sft.seed == 5
    assert config.robust.seed == config.agents.seed == config.verify.seed == 5 and config.align.device == "cpu"
    with pytest.raises(ConfigError, match="one root seed"):
        AuditConfig(seed=4)
    assert with_seed(AuditConfig(), 4).verify.seed == 4
