"""The digits robustness study over several seeds, summarised as mean ± standard deviation.

    python scripts/robust_seeds.py runs/robust-seeds --seeds 0 1 2     # run (resumes finished seeds)
    python scripts/robust_seeds.py runs/robust-seeds --summarize       # the tables of docs/results.md

Each seed runs ``safetylab.robust.suite`` in ``DIR/seedN`` with the standard, a PGD-trained and a
TRADES-trained classifier (the seed changes the data split, the initialisation, training and the attacks).
The summary averages every numeric cell of every table over the seeds that finished, keyed by the
table's label columns.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from statistics import fmean, stdev

import torch

from safetylab.core.runs import RunDir
from safetylab.robust.suite import RobustSuiteConfig, run_suite
from safetylab.robust.training import RobustTrainConfig

KEYS = {"model", "eps", "predictor", "inputs", "detector", "ood", "shift", "severity", "score", "measure"}


def config_for(seed: int) -> RobustSuiteConfig:
    return replace(RobustSuiteConfig(), seed=seed, adversarial=(
        RobustTrainConfig(method="pgd", epochs=30, eps=0.15), RobustTrainConfig(method="trades", epochs=30, eps=0.15)))


def run(out: Path, seeds: list[int]) -> None:
    for seed in seeds:
        directory = out / f"seed{seed}"
        if (directory / "sections.json").is_file():
            print(f"seed {seed}: done earlier")
            continue
        config = config_for(seed)
        start = time.perf_counter()
        run_suite(config, RunDir(directory, asdict(config)), log=lambda line, s=seed: print(f"seed {s}: {line}"))
        print(f"seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)


def summarize(out: Path) -> str:
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("seed*/sections.json"))]
    if not runs:
        raise SystemExit(f"{out}: no finished seed (seed*/sections.json)")
    lines = [f"Mean ± standard deviation over {len(runs)} seeds.", ""]
    for name, section in runs[0].items():
        lines += [f"### {section['title']}", ""]
        for t, table in enumerate(section["tables"]):
            columns = table["columns"]
            keys = [i for i, c in enumerate(columns) if c in KEYS]
            cells: dict[tuple, list[list]] = {}
            for r in runs:
                for row in r[name]["tables"][t]["rows"]:
                    cells.setdefault(tuple(row[i] for i in keys), []).append(row)
            lines += [f"**{table['title']}**", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            for rows in cells.values():
                lines.append("| " + " | ".join(_cell([row[i] for row in rows], i in keys) for i in range(len(columns)))
                             + " |")
            lines.append("")
    return "\n".join(lines)


def _cell(values: list, is_key: bool) -> str:
    if is_key or not all(isinstance(v, (int, float)) for v in values):
        return "–" if values[0] is None else str(values[0])
    return f"{fmean(values):.3f} ± {stdev(values) if len(values) > 1 else 0.0:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--summarize", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.summarize:
        print(summarize(args.out))
    else:
        run(args.out, args.seeds)


if __name__ == "__main__":
    main()
