"""The evaluation harness against Inspect AI on the same mock work, and the HTTP target against the guarded
server's own capacity.

Part ``harness``: 100 samples (a question and its answer), a model that answers at once with a fixed text, a
scorer that checks the answer, logging on. Inspect: ``eval(Task(dataset, generate(), includes()),
model=get_model("mockllm/model", custom_outputs=...), log_format="json"|"eval", display="none")``. safetylab:
``run_task(Task(dataset, includes), FunctionTarget(...), log_dir)``. The floor: a bare asyncio loop doing the same
calls and comparisons, no logs. Per side and round the wall time of one whole run; ratios paired by round.

Part ``http``: ``safetylab serve --echo`` behind its rules guard; its capacity measured by ``wrk -c32`` on the
same request, then the harness's :class:`OpenAITarget` with 32 connections sending the same number of requests
through ``run_task``. If the harness reaches the server's capacity, the server, not the harness, limits an
evaluation over HTTP.

    .venv/bin/python benchmarks/evals_vs_inspect.py              # both parts, about a minute
    .venv/bin/python benchmarks/evals_vs_inspect.py --only harness --rounds 9
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

N = 100
TARGET_MS, TARGET_RATIO = 1.0, 8.0


def questions(n: int) -> list[tuple[str, str]]:
    return [(f"what is {i} plus 1 ?", str(i + 1)) for i in range(n)]


def run_inspect(n: int, log_format: str) -> float:
    from inspect_ai import Task, eval
    from inspect_ai.dataset import Sample
    from inspect_ai.model import ModelOutput, ModelUsage, get_model
    from inspect_ai.scorer import includes
    from inspect_ai.solver import generate

    data = questions(n)
    outputs = [ModelOutput.from_content("mockllm/model", answer) for _, answer in data]
    for output in outputs:  # usage given, or the mock counts tokens with tiktoken, which downloads its tables
        output.usage = ModelUsage(input_tokens=8, output_tokens=1, total_tokens=9)
    model = get_model("mockllm/model", custom_outputs=outputs)
    task = Task(dataset=[Sample(input=q, target=a) for q, a in data], solver=generate(), scorer=includes())
    with tempfile.TemporaryDirectory() as logs:
        start = time.perf_counter()
        (log,) = eval(task, model=model, log_dir=logs, log_format=log_format, display="none", max_samples=n)
        seconds = time.perf_counter() - start
    assert log.status == "success" and log.results.scores[0].metrics["accuracy"].value == 1.0, log.status
    return seconds


def run_safetylab(n: int) -> float:
    from safetylab.evals.harness import Sample, Task, includes, run_task
    from safetylab.evals.targets import FunctionTarget

    data = questions(n)
    answers = dict(data)
    task = Task("bench", [Sample(i, q, a) for i, (q, a) in enumerate(data)], includes, group_by=None)
    with tempfile.TemporaryDirectory() as logs:
        start = time.perf_counter()
        run = run_task(task, FunctionTarget(answers.__getitem__), logs, concurrency=n)
        seconds = time.perf_counter() - start
    assert run.errors == 0 and run.estimate("correct").value == 1.0
    return seconds


def run_floor(n: int) -> float:
    data = questions(n)
    answers = dict(data)

    async def one(question, target):
        await asyncio.sleep(0)
        return target in answers[question]

    async def main():
        return await asyncio.gather(*(one(q, a) for q, a in data))

    start = time.perf_counter()
    assert all(asyncio.run(main()))
    return time.perf_counter() - start


def part_harness(args) -> None:
    import inspect_ai

    sides = {"inspect (json log)": lambda: run_inspect(args.samples, "json"),
             "inspect (.eval log)": lambda: run_inspect(args.samples, "eval"),
             "safetylab (json log + sample stream)": lambda: run_safetylab(args.samples),
             "bare asyncio (no log)": lambda: run_floor(args.samples)}
    for side in sides.values():  # warm-up: imports, first-run caches
        side()
    rounds = []
    for r in range(args.rounds):
        names = list(sides)[r % len(sides):] + list(sides)[:r % len(sides)]
        rounds.append({name: sides[name]() for name in names})
    print(f"\nharness: {args.samples} samples, {args.rounds} rounds (inspect-ai {inspect_ai.__version__})")
    per = {name: statistics.median(r[name] for r in rounds) * 1000 / args.samples for name in sides}
    for name, ms in per.items():
        print(f"  {name:40} {ms:7.3f} ms a sample")
    ours = "safetylab (json log + sample stream)"
    for peer in ("inspect (json log)", "inspect (.eval log)"):
        ratios = [r[peer] / r[ours] for r in rounds]
        ratio = statistics.median(ratios)
        print(f"  safetylab speed / {peer}: {ratio:.1f}x ({min(ratios):.1f}-{max(ratios):.1f}) "
              f"(target >= {TARGET_RATIO:g}: {'meets' if ratio >= TARGET_RATIO else 'MISSES'})")
    overhead = per[ours] - per["bare asyncio (no log)"]
    print(f"  safetylab overhead over the bare loop: {overhead:.3f} ms a sample (target <= {TARGET_MS:g}: "
          f"{'meets' if overhead <= TARGET_MS else 'MISSES'})")


def part_http(args) -> None:
    import re
    import socket
    import urllib.request

    from safetylab.control.config import write_guard
    from safetylab.control.state import State
    from safetylab.evals.harness import Sample, Task, includes, run_task
    from safetylab.evals.targets import OpenAITarget

    directory = Path(tempfile.mkdtemp(prefix="evals-http-"))
    write_guard(directory / "rules.yaml", [{"kind": "rules", "max_chars": 4000,
                                            "rules": [{"pattern": r"\bpoison\b", "decision": "block"}]}], [])
    key = State(directory / "state.db").add_key("bench", "user", rate_per_minute=1e12)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "safetylab", "serve", "--echo", "--guard",
                               str(directory / "rules.yaml"), "--state", str(directory / "state.db"), "--log",
                               str(directory / "audit.db"), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(urllib.request.Request(f"{url}/models",
                                                              headers={"Authorization": f"Bearer {key}"}), timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit(f"the server did not start: {server.stderr.read().decode()[-2000:]}") from None
                time.sleep(0.2)
        script = directory / "post.lua"
        script.write_text('wrk.method = "POST"\nwrk.body = \'{"model": "safetylab-world", "messages": [{"role": '
                          '"user", "content": "what is 1 plus 1 ?"}], "max_tokens": 48, "temperature": 1.0}\'\n'
                          'wrk.headers["Content-Type"] = "application/json"\n'
                          f'wrk.headers["Authorization"] = "Bearer {key}"\n')
        rates = []
        for r in range(args.rounds):
            out = subprocess.run(["wrk", "-t1", "-c32", f"-d{args.seconds}s", "-s", str(script),
                                  f"{url}/chat/completions"], capture_output=True, text=True, check=True).stdout
            wrk_rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
            n = max(200, int(wrk_rate * args.seconds))
            task = Task(f"http{r}", [Sample(i, "what is 1 plus 1 ?", "2") for i in range(n)], includes, group_by=None)
            start = time.perf_counter()
            run = run_task(task, OpenAITarget(url, "safetylab-world", key, max_connections=32), directory / "logs",
                           concurrency=32)
            harness_rate = n / (time.perf_counter() - start)
            assert run.errors == 0, run.records[0]["error"]
            rates.append((wrk_rate, harness_rate))
            print(f"  round {r + 1}: wrk {wrk_rate:.0f} req/s, harness {harness_rate:.0f} req/s ({n} samples)",
                  flush=True)
    finally:
        server.terminate()
        server.wait(30)
    ratio = statistics.median(h / w for w, h in rates)
    print(f"\nhttp: the guarded server's capacity (wrk -c32) {statistics.median(w for w, _ in rates):.0f} req/s; "
          f"through the harness {statistics.median(h for _, h in rates):.0f} req/s: {ratio:.2f} of it")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("harness", "http"), action="append")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=N)
    parser.add_argument("--seconds", type=int, default=3, help="http: seconds of wrk per round")
    args = parser.parse_args()
    os.environ.setdefault("INSPECT_DISPLAY", "none")
    print(f"Python {sys.version.split()[0]}; {os.cpu_count()} CPUs; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for part in args.only or ("harness", "http"):
        {"harness": part_harness, "http": part_http}[part](args)


if __name__ == "__main__":
    main()
