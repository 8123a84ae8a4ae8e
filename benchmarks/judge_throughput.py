"""Gold-judge throughput: ``World().judge.score(prompt, response)`` judgements per second on one core.

The pairs are world requests of every kind, both splits, answered in every style of their kind
(``World.request``, ``World.respond``, ``STYLES``), with jailbroken prompts mixed in (half of the
harmful requests and a tenth of the others, every wrapper in ``content.JAILBREAKS``). Three passes:

- cold: ``score(prompt_text, response)`` on a fresh ``World()`` (its prompt-parse cache empty; the
  world is built outside the timed region), so every distinct prompt is parsed once;
- warm: the same pairs again on that judge, every prompt now a cache hit;
- parsed: ``score(request, response)`` given the ``Request`` objects (no parsing at all);
- cold, distinct: the cold pass over only the first pair of each distinct prompt, so every
  judgement parses its prompt (the worst case: a stream of prompts never seen before).

Each pass is repeated and the median is reported. The process is pinned to one core (``--core``).

    python benchmarks/judge_throughput.py
    python benchmarks/judge_throughput.py --pairs 50000 --repeats 7
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time

TARGET = 20_000  # judgements per second


def build_pairs(n: int, jailbreak_harmful: float, jailbreak_other: float):
    """``n`` (request, response) pairs cycling through kinds, splits and every style of each kind."""
    from safetylab.world import KINDS, STYLES, World, content

    world = World()
    rng = world.rng("benchmark", "judge-throughput")
    requests, responses = [], []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        split = ("train", "test")[(i // len(KINDS)) % 2]
        request = world.request(kind, split, rng)
        if rng.random() < (jailbreak_harmful if kind == "harmful" else jailbreak_other):
            request = world.jailbreak(request, rng.choice(content.JAILBREAKS), rng)
        styles = STYLES[kind]
        style = styles[(i // (2 * len(KINDS))) % len(styles)]
        requests.append(request)
        responses.append(world.respond(request, style, rng))
    return requests, responses


def check_parses(requests) -> int:
    """How many prompt texts a fresh judge reads back as a different kind (should be 0)."""
    from safetylab.world import World

    judge = World().judge
    return sum(judge.request(r.prompt).kind != r.kind for r in requests)


def timed_pass(judge, prompts, responses) -> float:
    """Seconds to score every pair once."""
    score = judge.score
    gc.collect()
    start = time.perf_counter()
    for prompt, response in zip(prompts, responses):
        score(prompt, response)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=20_000, help="(prompt, response) pairs (default 20000)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes of each kind (default 5)")
    parser.add_argument("--core", type=int, default=None,
                        help="CPU to pin the process to (default: the last one allowed; -1: no pinning)")
    args = parser.parse_args()

    pinned = "not pinned"
    if args.core != -1 and hasattr(os, "sched_setaffinity"):
        core = max(os.sched_getaffinity(0)) if args.core is None else args.core
        os.sched_setaffinity(0, {core})
        pinned = f"pinned to CPU {core}"

    from safetylab.world import World, content

    started = time.perf_counter()
    requests, responses = build_pairs(args.pairs, 0.5, 0.1)
    prompts = [r.prompt for r in requests]
    jailbroken = sum(r.jailbreak is not None for r in requests)
    wrappers = sorted({r.jailbreak for r in requests if r.jailbreak})
    misread = check_parses(requests)
    print(f"Python {platform.python_version()}, {os.cpu_count()} CPUs, {pinned}")
    print(f"{len(prompts)} pairs: {len(set(prompts))} distinct prompts, {jailbroken} jailbroken "
          f"({len(wrappers)} of {len(content.JAILBREAKS)} wrappers), {len(set(responses))} distinct responses; "
          f"prompts read back as another kind: {misread}")

    first = {}
    for i, prompt in enumerate(prompts):
        first.setdefault(prompt, i)
    distinct = sorted(first.values())
    d_prompts, d_responses = [prompts[i] for i in distinct], [responses[i] for i in distinct]

    cold, judges = [], []
    for _ in range(args.repeats):
        judge = World().judge  # fresh world: empty prompt-parse cache (built outside the timing)
        cold.append(timed_pass(judge, prompts, responses))
        judges.append(judge)
    warm_judge = judges[-1]
    del judges
    warm = [timed_pass(warm_judge, prompts, responses) for _ in range(args.repeats)]
    parsed = [timed_pass(warm_judge, requests, responses) for _ in range(args.repeats)]
    cold_distinct = [timed_pass(World().judge, d_prompts, d_responses) for _ in range(args.repeats)]

    print()
    print(f"{'pass':<30} {'pairs':>6} {'median /s':>10} {'us/judgement':>13} {'vs target':>10}   all passes (/s)")
    results = {}
    for name, times, n in (("cold (prompt text, fresh)", cold, len(prompts)),
                           ("warm (prompt text, cached)", warm, len(prompts)),
                           ("parsed Request", parsed, len(prompts)),
                           ("cold, distinct prompts only", cold_distinct, len(d_prompts))):
        rate = n / statistics.median(times)
        results[name] = rate
        each = " ".join(f"{n / t:,.0f}" for t in times)
        print(f"{name:<30} {n:>6} {rate:>10,.0f} {1e6 / rate:>13.1f} {rate / TARGET:>9.2f}x   {each}")
    print()
    for name, rate in results.items():
        verdict = "meets" if rate >= TARGET else "MISSES"
        print(f"judgements/s, {name}: {rate:,.0f}  ratio to the {TARGET:,}/s target: {rate / TARGET:.2f} ({verdict})")
    print(f"total wall time {time.perf_counter() - started:.0f} s")
    if misread:
        sys.exit(1)


if __name__ == "__main__":
    main()
