"""``safetylab audit``: every subsystem's study on the built-in world, and the report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from safetylab.cli.common import Device, Seed, Seeds, options, parse_seeds


def audit(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")] = Path("runs/audit"),
    quick: Annotated[bool, typer.Option(help="Smaller models and data, same stages (about a minute).")] = False,
    seed: Seed = 0,
    seeds: Seeds = None,
    device: Device = "auto",
    config: Annotated[Path | None, typer.Option(help="YAML/JSON file of AuditConfig fields.")] = None,
) -> None:
    """Run the safety audit on the built-in assistant world and write report.html and report.json (with
    --seeds: one audit per seed in OUT/seed-N and the mean ± sd summary)."""
    from safetylab.audit import run_audit
    from safetylab.core.summary import run_seeds

    chosen = parse_seeds(seeds) if seeds is not None else [seed]
    configs = {s: _config(quick, s, device, config) for s in chosen}
    if out == Path("runs/audit") and quick:
        out = Path("runs/audit-quick")
    log = lambda line: print(line, flush=True)  # noqa: E731
    if seeds is None:
        run_audit(configs[seed], out, log)
        print(f"report: {out / 'report.html'}\n        {out / 'report.json'}")
        return
    run_seeds(lambda s, directory: run_audit(configs[s], directory, log), chosen, out, log)
    print(f"reports: {out}/seed-N/report.html\nsummary over seeds {seeds}: {out / 'summary.md'}")


def _config(quick: bool, seed: int, device: str, path: Path | None):
    """The audit's config for ``seed``, with the fields of the file at ``path`` (YAML or JSON) over it; the
    root ``seed`` and ``device`` (the option's or the file's) reach every study."""
    from safetylab.audit import AuditConfig, audit_config, with_seed
    from safetylab.audit.stages import STUDIES
    from safetylab.core.config import config_from_dict, config_to_dict, read_config_file

    with options("seed", "device"):
        chosen = audit_config(quick=quick, seed=seed, device=device)
    if path is None:
        return chosen
    data = _merge(config_to_dict(chosen), read_config_file(path))
    for study in (s.name for s in STUDIES):  # one root seed: the file's top-level one
        if isinstance(data.get(study), dict):
            data[study]["seed"] = data.get("seed")
    config = config_from_dict(AuditConfig, data, where=str(path))
    return with_seed(config, config.seed, config.device)


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged
