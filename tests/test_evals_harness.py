"""The evaluation harness: tasks, solvers, scorers, intervals, streamed logs that resume, Inspect's log format,
and the targets (a function, a local model in batches, an OpenAI-compatible endpoint)."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from safetylab.core.errors import SafetylabError
from safetylab.evals.harness import Sample, Score, Task, TaskState, generate, read_dataset, run_task
from safetylab.evals.metrics import bootstrap_interval, estimate, summarise, wilson_interval
from safetylab.evals.targets import FunctionTarget, GenerateConfig, LocalTarget, OpenAITarget, TargetError

# ----------------------------------------------------------------------------- metrics


def test_wilson_interval_matches_the_formula():
    z = 1.959963984540054
    for k, n in ((0, 10), (3, 40), (20, 20), (7, 9)):
        p = k / n
        centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        expected = ((centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n))
        np.testing.assert_allclose(wilson_interval(k, n), expected, atol=1e-9)
    with pytest.raises(SafetylabError, match="0 <= successes <= n"):
        wilson_interval(5, 4)


def test_bootstrap_interval_covers_the_mean_and_narrows_with_n():
    rng = np.random.default_rng(0)
    small, large = rng.normal(1.0, 1.0, 30), rng.normal(1.0, 1.0, 3000)
    lo_s, hi_s = bootstrap_interval(small)
    lo_l, hi_l = bootstrap_interval(large)
    assert lo_s < small.mean() < hi_s and lo_l < 1.0 < hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 5
    assert bootstrap_interval([2.0, 2.0]) == (2.0, 2.0)
    with pytest.raises(SafetylabError, match="finite"):
        bootstrap_interval([1.0, float("nan")])


def test_summarise_uses_wilson_for_rates_and_bootstrap_for_means_by_group():
    scores = [{"hit": 1, "len": 3.0}, {"hit": 0, "len": 5.0}, {"hit": 1}, {"hit": None, "len": 4.0}]
    out = summarise(scores, ["a", "a", "b", "b"])
    assert out["hit"]["all"].method == "wilson" and out["hit"]["all"].n == 3 and out["hit"]["all"].value == 2 / 3
    assert out["hit"]["by"]["a"].value == 0.5 and out["hit"]["by"]["b"].n == 1
    assert out["len"]["all"].method == "bootstrap" and out["len"]["all"].value == 4.0
    assert estimate([True, False, True, True]).value == 0.75


# ----------------------------------------------------------------------------- the harness
def arithmetic(n: int = 40) -> list[Sample]:
    return [Sample(i, f"what is {i} plus 1 ?", str(i + 1), {"kind": "even" if i % 2 == 0 else "odd"})
            for i in range(n)]


def exact(state: TaskState) -> Score:
    return Score({"correct": int(state.completion.strip() == state.sample.target)}, answer=state.completion)


def answer(prompt: str) -> str:
    n = int(prompt.split()[2])
    if n == 7:
        raise TargetError("the model is down for this one")
    return str(n + 1) if n % 3 else "no idea"


def test_a_task_runs_scores_and_keeps_each_error_as_a_record(tmp_path):
    run = run_task(Task("arith", arithmetic(), exact), FunctionTarget(answer), tmp_path)
    assert run.errors == 1 and len(run.records) == 40
    bad = next(r for r in run.records if r["id"] == 7)
    assert "down for this one" in bad["error"]["message"] and bad["scores"] is None
    correct = [r["id"] for r in run.records if r["scores"] and r["scores"]["exact"]["value"]["correct"]]
    assert correct == [i for i in range(40) if i % 3 and i != 7]
    est = run.estimate("correct")
    assert est.n == 39 and est.value == len(correct) / 39 and est.low < est.value < est.high
    assert run.estimate("correct", "odd").n == 19
    assert [r["id"] for r in run.records] == list(range(40))  # in dataset order, however they finished


def test_the_log_is_inspects_format(tmp_path):
    inspect_log = pytest.importorskip("inspect_ai.log")
    run = run_task(Task("arith", arithmetic(), exact), FunctionTarget(answer), tmp_path)
    log = inspect_log.read_eval_log(str(run.log))
    assert log.status == "success" and log.eval.task == "arith" and log.eval.model == "function"
    assert len(log.samples) == 40 and log.samples[7].error is not None
    assert log.samples[1].scores["exact"].value == {"correct": 1} and log.samples[1].output.completion == "2"
    metric = log.results.scores[0]
    assert metric.name == "correct" and metric.metrics["mean"].value == pytest.approx(run.estimate("correct").value)
    assert metric.metrics["ci_low"].value < metric.metrics["mean"].value < metric.metrics["ci_high"].value


def test_a_crashed_run_keeps_its_samples_and_a_rerun_resumes(tmp_path):
    calls = []

    def flaky(prompt):
        calls.append(prompt)
        if len(calls) == 25:
            raise KeyboardInterrupt  # the run dies mid-way, not a per-sample error
        return "1"

    task = Task("arith", arithmetic(), exact)
    with pytest.raises(KeyboardInterrupt):
        run_task(task, FunctionTarget(flaky), tmp_path, concurrency=1)
    lines = (tmp_path / "arith.samples.jsonl").read_text().splitlines()
    assert len(lines) == 1 + 24  # the header and every sample finished before the crash
    with (tmp_path / "arith.samples.jsonl").open("a") as f:
        f.write('{"id": 99, "torn')  # a half-written line, as a kill leaves it
    calls.clear()
    run = run_task(task, FunctionTarget(lambda p: "1"), tmp_path)
    assert len(run.records) == 40 and run.errors == 0
    fails = run_task(Task("retry", arithmetic(9), exact), FunctionTarget(answer), tmp_path)
    assert fails.errors == 1  # sample 7: the model was down
    retried = run_task(Task("retry", arithmetic(9), exact), FunctionTarget(lambda p: "8"), tmp_path)
    assert retried.errors == 0 and len(retried.records) == 9  # only sample 7 was asked again, and now answered
    assert [r["output"]["completion"] for r in retried.records if r["id"] == 7] == ["8"]
    assert sum(r["output"]["completion"] == "8" for r in retried.records) == 1
    with pytest.raises(SafetylabError, match="logged by another run"):
        run_task(Task("arith", arithmetic(30), exact), FunctionTarget(lambda p: "1"), tmp_path)
    run_task(Task("arith", arithmetic(30), exact), FunctionTarget(lambda p: "1"), tmp_path, resume=False)


def test_solvers_chain_and_a_broken_scorer_is_a_sample_error(tmp_path):
    async def shout(state, target):
        state.messages[-1]["content"] = state.sample.input.upper()
        state.store["attack"] = "upper"
        return state

    seen = []
    task = Task("chain", arithmetic(4), lambda s: Score({"seen": 1}) if s.store["attack"] == "upper" else None,
                [shout, generate(GenerateConfig(max_tokens=4))])
    run = run_task(task, FunctionTarget(lambda p: seen.append(p) or "x"), tmp_path)
    assert seen and all(p.isupper() for p in seen) and run.errors == 0
    broken = Task("broken", arithmetic(3), lambda s: {"not": "a score"})
    run = run_task(broken, FunctionTarget(lambda p: "x"), tmp_path)
    assert run.errors == 3 and "expected a Score" in run.records[0]["error"]["message"]
    run = run_task(Task("nan", arithmetic(2), lambda s: Score({"x": float("nan")})), FunctionTarget(str), tmp_path)
    assert run.errors == 2 and "expected a finite number" in run.records[0]["error"]["message"]


def test_bad_tasks_and_datasets_are_refused_with_where(tmp_path):
    with pytest.raises(SafetylabError, match=r"dataset\[1\]: id 0 appears twice"):
        Task("t", [Sample(0, "a"), Sample(0, "b")], exact)
    with pytest.raises(SafetylabError, match=r"dataset\[0\]: input"):
        Task("t", [Sample(0, "  ")], exact)
    path = tmp_path / "d.jsonl"
    path.write_text('{"input": "hi", "target": "x"}\n{"target": "y"}\n')
    with pytest.raises(SafetylabError, match="line 2: expected a string field 'input'"):
        read_dataset(path)
    path.write_text('{"input": "hi", "metadata": {"kind": "k"}}\n{"input": "yo", "id": "b"}\n')
    assert [(s.id, s.input, s.metadata) for s in read_dataset(path)] == [(1, "hi", {"kind": "k"}), ("b", "yo", {})]


def test_the_local_target_answers_concurrent_requests_in_batches(tok, tiny_lm):
    import torch

    target = LocalTarget(tiny_lm("gpt2"), tok, max_batch=8)
    sizes = []
    original = target._sample
    target._sample = lambda prompts, config: sizes.append(len(prompts)) or original(prompts, config)

    async def many():
        messages = [[{"role": "user", "content": f"what is {i} plus 2 ?"}] for i in range(20)]
        return await asyncio.gather(*(target.generate(m, GenerateConfig(max_tokens=3)) for m in messages))

    torch.manual_seed(0)
    outputs = asyncio.run(many())
    assert sizes == [8, 8, 4] and len(outputs) == 20
    assert all(isinstance(o.text, str) and o.stop_reason in ("stop", "max_tokens") for o in outputs)


# ----------------------------------------------------------------------------- the HTTP target
def test_the_openai_target_retries_server_errors_and_reports_the_rest():
    from aiohttp import web

    hits = {"n": 0}

    async def handler(request: web.Request) -> web.Response:
        hits["n"] += 1
        body = await request.json()
        prompt = body["messages"][-1]["content"]
        assert request.headers["Authorization"] == "Bearer sk" and body["max_tokens"] == 48
        if prompt == "flaky" and hits["n"] % 2:
            return web.json_response({"error": {"message": "busy"}}, status=503)
        if prompt == "bad":
            return web.json_response({"error": {"message": "messages: no"}}, status=400)
        if prompt == "junk":
            return web.Response(text="not json")
        return web.json_response({"model": "m", "choices": [{"message": {"content": prompt[::-1]},
                                                             "finish_reason": "length"}],
                                  "safetylab": {"decision": "allow"}})

    async def scenario():
        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        target = OpenAITarget(f"http://127.0.0.1:{port}/v1", "m", "sk", retries=2, backoff=0.0)
        try:
            out = await target.generate([{"role": "user", "content": "flaky"}])
            assert out.text == "ykalf" and out.stop_reason == "max_tokens"
            assert out.metadata == {"guard": {"decision": "allow"}} and hits["n"] == 2  # one retry
            for prompt, message in (("bad", "HTTP 400: messages: no"), ("junk", "not a chat completion")):
                with pytest.raises(TargetError, match=message):
                    await target.generate([{"role": "user", "content": prompt}])
        finally:
            await target.close()
            await runner.cleanup()

    asyncio.run(scenario())


def test_an_unreachable_endpoint_is_a_per_sample_error_not_a_lost_run(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    target = OpenAITarget(f"http://127.0.0.1:{port}/v1", "m", retries=1, backoff=0.0, timeout=2)
    run = run_task(Task("down", arithmetic(3), exact), target, tmp_path)
    assert run.errors == 3 and "Cannot connect to host" in run.records[0]["error"]["message"]
    assert "after 2 attempts" in run.records[0]["error"]["message"] and run.log.is_file()


def test_a_guarded_target_answers_as_the_server_would(tmp_path):
    from safetylab.control.guard import REFUSAL, Guard
    from safetylab.control.layers import Rule, RulesLayer
    from safetylab.evals.targets import GuardedTarget

    asked = []
    inner = FunctionTarget(lambda p: asked.append(p) or f"sure : {p}")
    guard = Guard([RulesLayer(rules=[Rule(r"\bpoison\b", "block", "poison"), Rule(r"\bmaybe\b", "escalate")])],
                  [RulesLayer("secrets", [Rule(r"sk-\w+", "modify")])])
    target = GuardedTarget(inner, guard)

    async def ask(text):
        return await target.generate([{"role": "user", "content": text}])

    blocked = asyncio.run(ask("how do i poison it"))
    assert blocked.text == REFUSAL and blocked.stop_reason == "content_filter" and asked == []
    assert blocked.metadata["guard"] == {"decision": "block", "reason": "poison"}
    held = asyncio.run(ask("maybe tell me"))
    assert held.text == "" and held.metadata["guard"]["decision"] == "escalate" and asked == ["maybe tell me"]
    redacted = asyncio.run(ask("my key is sk-abc"))
    assert redacted.text == "sure : my key is [redacted]" and redacted.metadata["guard"]["decision"] == "modify"
    assert target.name == "function+guard"
