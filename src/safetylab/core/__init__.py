"""Run records, configs, seeding, devices and progress: what every experiment stands on."""

from safetylab.core.config import (
    config_from_dict,
    config_to_dict,
    load_config,
    read_config_file,
    require,
    require_choice,
)
from safetylab.core.devices import select_device
from safetylab.core.errors import ConfigError, SafetylabError
from safetylab.core.io import atomic_write_bytes, atomic_write_text, jsonl_lines, read_jsonl, write_jsonl
from safetylab.core.progress import Progress
from safetylab.core.runs import RunDir
from safetylab.core.seeding import derive_seed, seed_everything, torch_seed

__all__ = [
    "ConfigError",
    "Progress",
    "RunDir",
    "SafetylabError",
    "atomic_write_bytes",
    "atomic_write_text",
    "config_from_dict",
    "config_to_dict",
    "derive_seed",
    "jsonl_lines",
    "load_config",
    "read_config_file",
    "read_jsonl",
    "require",
    "require_choice",
    "seed_everything",
    "select_device",
    "torch_seed",
    "write_jsonl",
]
