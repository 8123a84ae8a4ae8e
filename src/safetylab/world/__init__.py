"""The assistant world: a model organism with known true values (see WORLD.md and docs/world.md)."""

from safetylab.world.judge import TABLE, GoldJudge, Score
from safetylab.world.labelers import PRESETS, Labeler, LabelerConfig
from safetylab.world.requests import BENIGN_KINDS, KINDS, Request
from safetylab.world.styles import GOOD_STYLE, STYLES
from safetylab.world.world import World, WorldConfig, chat

__all__ = [
    "BENIGN_KINDS", "GOOD_STYLE", "KINDS", "PRESETS", "STYLES", "TABLE",
    "GoldJudge", "Labeler", "LabelerConfig", "Request", "Score", "World", "WorldConfig", "chat",
]
