"""The documentation states what the code does."""

from pathlib import Path

from safetylab.world.judge import TABLE
from safetylab.world.labelers import PRESETS

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_world_doc_holds_the_judge_table_row_for_row():
    text = (DOCS / "world.md").read_text(encoding="utf-8")
    for (group, behaviour), (helpful, harmless, honest, utility) in TABLE.items():
        row = f"| {group} | {behaviour} | {helpful:+.1f} | {harmless:+.1f} | {honest:+.1f} | {utility:+.1f} |"
        assert row in text, f"docs/world.md lacks the scoring-table row {row}"


def test_world_doc_states_each_labeler_preset():
    text = (DOCS / "world.md").read_text(encoding="utf-8")
    for name, config in PRESETS.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| `{name}` | {config.tau:g} |"))
        assert f"| {config.length_bias:g} | {config.flattery_bias:g} | {config.confidence_bias:g} |" in row
