"""safetylab.core.study (sections, the stage runner) and safetylab.core.summary (a study over seeds)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import pytest

from safetylab.core.errors import SafetylabError
from safetylab.core.seeding import derive_seed, torch_seed
from safetylab.core.study import Context, Section, Stage, Table, run_stages, run_study, stage_names, tables_markdown
from safetylab.core.summary import run_seeds, summarize_seeds


@dataclass(frozen=True)
class Config:
    seed: int = 0
    n: int = 5


def draw_stage(ctx: Context) -> Section:
    """Randomness from the global generators, which the runner seeds for each stage."""
    import torch

    values = [random.random(), torch.rand(()).item()]
    (ctx.stage_dir("draw") / "values.txt").write_text(str(values))
    return Section("Draws", f"{values[0]:.3f}", [Table("draws", ["source", "value"], [["python", values[0]],
                                                                                      ["torch", values[1]]])],
                   data={"values": values})


def sum_stage(ctx: Context) -> Section:
    total = sum(ctx.section("draw").data["values"]) * ctx.config.n
    return Section("Sum", f"{total:.3f}", [Table("sum", ["what", "n", "total"], [["draws", ctx.config.n, total]])],
                   data={"total": total})


STAGES = (Stage("draw", "random draws", draw_stage), Stage("sum", "their sum", sum_stage))


def test_table_rows_must_match_columns():
    with pytest.raises(SafetylabError, match=r"table 't', row 1: 1 cells for 2 columns"):
        Table("t", ["a", "b"], [[1, 2], [3]])


def test_section_round_trips_through_json():
    section = Section("T", "s", [Table("t", ["a"], [[1.5], [None]])], ["plots/x.png"], [{"model": "m"}], {"k": [1]})
    again = Section.from_dict(json.loads(json.dumps(section.to_dict())))
    assert again == section and isinstance(again.tables[0], Table)
    assert section.moved("robust").plots == ["robust/plots/x.png"]


def test_study_writes_sections_tables_and_resumes_with_the_same_numbers(tmp_path):
    straight = run_study(STAGES, Config(), tmp_path / "a", log=lambda line: None)
    assert json.loads((tmp_path / "a" / "sections.json").read_text())["sum"]["data"]["total"] == \
        straight["sum"].data["total"]
    assert "| draws | 5 |" in (tmp_path / "a" / "tables.md").read_text()
    # an interrupted study: the first stage finished, the second did not; a rerun skips the first
    (tmp_path / "a" / "sum" / "section.json").unlink()
    logs: list[str] = []
    resumed = run_study(STAGES, Config(), tmp_path / "a", log=logs.append)
    assert "draw: done earlier, skipped" in logs[0]
    assert resumed["sum"].data == straight["sum"].data
    # a second stage run alone in a fresh directory sees the same draws as in a straight run: each stage
    # starts from its own derived seed, not from whatever ran before it
    only = run_study(STAGES, Config(), tmp_path / "b", only=["draw"], log=lambda line: None)
    assert only["draw"].data == straight["draw"].data
    other = run_study(STAGES, Config(seed=1), tmp_path / "c", log=lambda line: None)
    assert other["draw"].data != straight["draw"].data


def test_unknown_stage_names_are_an_error_before_anything_runs(tmp_path):
    with pytest.raises(SafetylabError, match="expected one or more of draw, sum, got bogus"):
        stage_names(STAGES, ["bogus"])
    with pytest.raises(SafetylabError):
        run_study(STAGES, Config(), tmp_path / "x", only=["bogus"])
    assert not (tmp_path / "x").exists()


def test_a_failing_stage_leaves_no_section(tmp_path):
    from safetylab.core.runs import RunDir

    def broken(ctx):
        raise RuntimeError("midway")

    ctx = Context(Config(), RunDir(tmp_path, {}))
    with pytest.raises(RuntimeError):
        run_stages([STAGES[0], Stage("broken", "fails", broken)], ctx, log=lambda line: None)
    assert (tmp_path / "draw" / "section.json").is_file() and not (tmp_path / "broken" / "section.json").exists()


def section(rows) -> Section:
    return Section("Robustness", "x", [Table("accuracy", ["model", "eps", "accuracy"], rows)])


def test_summarize_seeds_hand_computed():
    runs = {0: {"attack": section([["standard", 0.1, 0.5], ["pgd", 0.1, None]])},
            1: {"attack": section([["standard", 0.1, 0.7], ["pgd", 0.1, 0.9]])},
            2: {"attack": section([["standard", 0.1, 0.9], ["pgd", 0.1, 0.8]])}}
    summary = summarize_seeds(runs)["attack"]
    rows = summary.tables[0].rows
    assert rows[0][:2] == ["standard", 0.1]  # equal in every seed: kept as it is
    assert rows[0][2] == "0.700 ± 0.200"  # mean 0.7, sample sd 0.2
    assert rows[1][2] == "0.850 ± 0.071"  # None left out: mean of 0.9 and 0.8, sd 0.0707
    numbers = summary.data["tables"][0]
    assert numbers["mean"][0][2] == pytest.approx(0.7) and numbers["sd"][0][2] == pytest.approx(0.2)
    assert summary.data["seeds"] == [0, 1, 2] and summary.summary == "mean ± sd over seeds 0, 1, 2"
    assert "0.700 ± 0.200" in tables_markdown({"attack": summary})


def test_summarize_seeds_shows_a_per_seed_text_result_seed_by_seed():
    def table(head):
        return Section("Patching", "x", [Table("best", ["relation", "head", "score"], [["capital", head, 0.5]])])

    rows = summarize_seeds({0: {"p": table("head 2")}, 1: {"p": table("head 1")}, 2: {"p": table("head 2")}})["p"]
    assert rows.tables[0].rows[0] == ["capital", "head 2 / head 1 / head 2", 0.5]


def test_summarize_seeds_refuses_tables_that_do_not_line_up():
    twice = [["standard", 0.1, 0.5], ["standard", 0.2, 0.4]]  # the first column does not name the rows
    with pytest.raises(SafetylabError, match=r"row 1, column 'model': the label differs"):
        summarize_seeds({0: {"a": section(twice)}, 1: {"a": section([twice[0], ["pgd", 0.2, 0.4]])}})
    with pytest.raises(SafetylabError, match="number of rows differ"):
        summarize_seeds({0: {"a": section(twice)}, 1: {"a": section(twice[:1])}})
    with pytest.raises(SafetylabError, match="has sections"):
        summarize_seeds({0: {"a": section([])}, 1: {"b": section([])}})
    with pytest.raises(SafetylabError, match="columns differ"):
        summarize_seeds({0: {"a": section([])}, 1: {"a": Section("R", "x", [Table("accuracy", ["m"], [])])}})


def test_summarize_seeds_matches_rows_by_name_when_seeds_have_different_rows():
    """The layers that decided something differ between seeds: rows are matched by name, and a row some seeds
    lack says so."""
    runs = {0: {"a": section([["rules", 0.1, 2], ["classifier", 0.1, 4]])},
            1: {"a": section([["classifier", 0.1, 6]])},
            2: {"a": section([["classifier", 0.1, 8], ["monitor", 0.1, 1]])}}
    rows = summarize_seeds(runs)["a"].tables[0].rows
    assert rows == [["rules (seeds 0 only)", 0.1, 2], ["classifier", 0.1, "6.000 ± 2.000"],
                    ["monitor (seeds 2 only)", 0.1, 1]]

    def named(rows):  # two text columns name a row
        return Section("Guard", "x", [Table("decided", ["group", "layer", "prompts"], rows)])

    runs = {0: {"g": named([["benign", "ood", 4], ["harmful", "rules", 2]])},
            1: {"g": named([["benign", "ood", 2]])}}
    assert summarize_seeds(runs)["g"].tables[0].rows == [["benign", "ood", "3.000 ± 1.414"],
                                                          ["harmful (seeds 0 only)", "rules", 2]]


def test_run_seeds_writes_one_study_per_seed_and_the_summary(tmp_path):
    summary = run_seeds(lambda s, d: run_study(STAGES, Config(seed=s), d, log=lambda line: None), [0, 1], tmp_path,
                        log=lambda line: None)
    assert (tmp_path / "seed-0" / "sections.json").is_file() and (tmp_path / "seed-1" / "tables.md").is_file()
    row = summary["sum"].tables[0].rows[0]
    assert row[:2] == ["draws", 5] and "±" in row[2]
    assert "±" in (tmp_path / "summary.md").read_text()
    assert json.loads((tmp_path / "summary.json").read_text())["sum"]["data"]["seeds"] == [0, 1]
    with pytest.raises(SafetylabError, match="distinct integers"):
        run_seeds(lambda s, d: {}, [0, 0], tmp_path)


def test_derive_seed_is_stable_and_separates_purposes():
    assert derive_seed(0, "ensemble", 1) == derive_seed(0, "ensemble", 1)
    seeds = {derive_seed(root, "ensemble", i) for root in range(20) for i in range(20)}
    assert len(seeds) == 400  # seed s's member i + 1 is not seed s + 1's member i
    assert all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(0, "train") != derive_seed(0, "eval")


def test_torch_seed_restores_the_global_generator():
    import torch

    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    with torch_seed(123):
        inside = torch.rand(3)
    assert torch.equal(torch.rand(3), expected)
    with torch_seed(123):
        assert torch.equal(torch.rand(3), inside)


def test_a_stage_alone_reads_earlier_sections_from_the_run_or_says_what_it_needs(tmp_path):
    with pytest.raises(SafetylabError, match="needs the 'draw' stage's results"):
        run_study(STAGES, Config(), tmp_path / "a", only=["sum"], log=lambda line: None)
    first = run_study(STAGES, Config(), tmp_path / "b", only=["draw"], log=lambda line: None)
    then = run_study(STAGES, Config(), tmp_path / "b", only=["sum"], log=lambda line: None)  # same directory
    assert then["sum"].data["total"] == pytest.approx(sum(first["draw"].data["values"]) * 5)
