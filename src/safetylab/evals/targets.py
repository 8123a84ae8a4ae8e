"""What an evaluation talks to: a model answering chat messages, behind one async interface.

- :class:`LocalTarget`: a causal LM in this process (the world's assistant or any HF model with a chat
  template). Requests made while the event loop is busy are gathered and sampled in one batch, in a worker
  thread, so a thousand concurrent samples cost a few batched forward passes, not a thousand single ones;
- :class:`OpenAITarget`: any OpenAI-compatible ``/v1/chat/completions`` endpoint over HTTP (``safetylab serve``
  among them, so the guarded server can be attacked like any other), with bounded concurrency, a timeout,
  and retries with exponential backoff on connection errors, 429 and 5xx;
- :class:`GuardedTarget`: any target behind a :class:`~safetylab.control.guard.Guard`, in this process, as the
  guarded server would answer;
- :class:`FunctionTarget`: a Python function, for tests and for wrapping anything else.

A target's :meth:`~Target.generate` returns an :class:`Output` (the text, why it stopped, and for a guarded
server the guard's decision) or raises a :class:`TargetError`, which the harness records as that sample's
error; the run goes on.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from safetylab.core.config import require
from safetylab.core.errors import SafetylabError


class TargetError(SafetylabError):
    """A target could not answer one request (after its retries): recorded as the sample's error."""


@dataclass(frozen=True)
class Output:
    """A target's answer: ``text``, ``stop_reason`` (``stop``, ``max_tokens``, ``content_filter``, …), the
    ``model`` that answered, and anything else it said in ``metadata`` (a guarded server's decision)."""

    text: str
    stop_reason: str = "stop"
    model: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GenerateConfig:
    """Sampling settings a solver passes to :meth:`Target.generate`."""

    max_tokens: int = 48
    temperature: float = 1.0

    def __post_init__(self):
        require(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", "an integer >= 1",
                self.max_tokens)
        require(self.temperature >= 0, "temperature", "a number >= 0 (0: greedy)", self.temperature)


class Target:
    """A model an evaluation talks to: ``name``, and :meth:`generate` on a conversation (a list of
    ``{"role", "content"}`` messages, the last one the user's)."""

    name: str = "target"

    async def generate(self, messages: Sequence[dict[str, str]], config: GenerateConfig = GenerateConfig()) -> Output:
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections or threads (the harness calls it once a run is over)."""


def last_user_message(messages: Sequence[dict[str, str]], where: str) -> str:
    """The content of the last user message (models of the world answer one turn)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return message["content"]
    raise TargetError(f"{where}: no user message in the conversation")


class FunctionTarget(Target):
    """``function(prompt) -> str`` (sync or async) as a target: the last user message in, the text out."""

    def __init__(self, function: Callable, name: str = "function"):
        self.function, self.name = function, name

    async def generate(self, messages, config=GenerateConfig()) -> Output:
        out = self.function(last_user_message(messages, self.name))
        if asyncio.iscoroutine(out):
            out = await out
        if not isinstance(out, str):
            raise TargetError(f"{self.name}: returned {type(out).__name__}, expected a string")
        return Output(out, model=self.name)


class GuardedTarget(Target):
    """``target`` behind ``guard``, as ``safetylab serve`` puts a model behind it, in-process: the input layers on
    the user's message (``block`` or ``halt``: the refusal, the model never asked; ``modify``: the model gets the
    changed text), the output layers on the answer; an ``escalate`` is held for a person, so the user receives
    nothing yet (``escalation="pass"`` delivers it). The guard's decision is in the output's metadata."""

    def __init__(self, target: Target, guard, name: str | None = None, escalation: str = "hold",
                 refusal: str | None = None):
        from safetylab.control.guard import REFUSAL

        require(escalation in ("hold", "pass"), "escalation", "hold or pass", escalation)
        self.target, self.guard, self.escalation = target, guard, escalation
        self.name, self.refusal = name or f"{target.name}+guard", REFUSAL if refusal is None else refusal

    async def _check(self, check, *args):
        return await asyncio.to_thread(check, *args) if self.guard.blocking else check(*args)

    async def generate(self, messages, config=GenerateConfig()) -> Output:
        from safetylab.control.guard import STOPS, delivery

        prompt = last_user_message(messages, self.name)
        checked = await self._check(self.guard.check_input, prompt)
        verdicts = [checked]
        answer = None
        if checked.allowed:
            answer = await self.target.generate([*messages[:-1], {"role": "user", "content": checked.text}], config)
            verdicts.append(await self._check(self.guard.check_output, checked.text, answer.text))
        decision, text = delivery(verdicts, self.refusal, self.escalation == "hold")
        meta = {"guard": {"decision": decision, "reason": next((v.reason for v in verdicts if v.decision == decision),
                                                               "")}}
        if decision in STOPS or text is None:  # refused, or held for review: the user receives nothing yet
            return Output(text or "", "content_filter", self.name, meta)
        return Output(text, answer.stop_reason, self.name, meta)

    async def close(self) -> None:
        await self.target.close()


class LocalTarget(Target):
    """A causal LM (``model``, ``tokenizer`` with a chat template) answering in batches: every request made
    before the event loop's next turn joins one :func:`safetylab.models.sampling.sample` call (at most
    ``max_batch`` prompts, one sampling setting per batch), run in a worker thread while the loop goes on
    gathering the next. Sampling draws from the torch seed in force, so a seeded run is repeatable."""

    def __init__(self, model, tokenizer, name: str = "local", max_batch: int = 128):
        require(isinstance(max_batch, int) and max_batch >= 1, "max_batch", "an integer >= 1", max_batch)
        self.model, self.tokenizer, self.name, self.max_batch = model.eval(), tokenizer, name, max_batch
        self._queue: list[tuple[str, GenerateConfig, asyncio.Future]] = []
        self._running = False

    async def generate(self, messages, config=GenerateConfig()) -> Output:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((last_user_message(messages, self.name), config, future))
        if not self._running:
            self._running = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            await asyncio.sleep(0)  # let every request of this turn of the loop join the batch
            while self._queue:
                config = self._queue[0][1]
                batch = [item for item in self._queue if item[1] == config][:self.max_batch]
                taken = {id(item) for item in batch}
                self._queue = [item for item in self._queue if id(item) not in taken]
                try:
                    outputs = await asyncio.to_thread(self._sample, [prompt for prompt, _, _ in batch], config)
                except Exception as e:  # noqa: BLE001 - every request of the batch learns why
                    error = TargetError(f"{self.name}: sampling failed ({type(e).__name__}: {e})")
                    outputs = [error] * len(batch)
                for (_, _, future), output in zip(batch, outputs):
                    if future.done():
                        continue
                    if isinstance(output, Exception):
                        future.set_exception(output)
                    else:
                        future.set_result(output)
        finally:
            self._running = False

    def _sample(self, prompts: list[str], config: GenerateConfig) -> list[Output]:
        import torch

        from safetylab.models.sampling import sample

        with torch.no_grad():
            samples = sample(self.model, self.tokenizer, prompts, max_new_tokens=config.max_tokens,
                             temperature=config.temperature or 1.0, greedy=config.temperature == 0,
                             batch_size=len(prompts))
        return [Output(text, "stop" if finished else "max_tokens", self.name)
                for text, finished in zip(samples.texts, samples.finished.tolist())]


class OpenAITarget(Target):
    """An OpenAI-compatible chat endpoint: ``base_url`` (``http://127.0.0.1:8000/v1``), ``model``, ``api_key``.
    At most ``max_connections`` requests in flight; each times out after ``timeout`` seconds and is retried
    up to ``retries`` times on a connection error, a timeout, 429 or 5xx, waiting ``backoff`` · 2^attempt
    seconds (± 25 % jitter, or the server's ``Retry-After``). A 4xx other than 429 is not retried. An empty
    answer is an answer (its text is ""); a body that is not a chat completion is a :class:`TargetError`.
    The client is aiohttp's (a few times less CPU a request than httpx's, whose connection pool would limit
    an evaluation before the server does)."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, max_connections: int = 32,
                 timeout: float = 60.0, retries: int = 3, backoff: float = 0.5, name: str | None = None):
        require(isinstance(base_url, str) and base_url.startswith(("http://", "https://")), "base_url",
                "a URL starting with http:// or https://", base_url)
        require(isinstance(max_connections, int) and max_connections >= 1, "max_connections", "an integer >= 1",
                max_connections)
        require(isinstance(retries, int) and retries >= 0, "retries", "an integer >= 0", retries)
        require(timeout > 0 and backoff >= 0, "timeout", "timeout > 0 and backoff >= 0", (timeout, backoff))
        self.url, self.model, self.name = base_url.rstrip("/") + "/chat/completions", model, name or model
        self.max_connections, self.timeout, self.retries, self.backoff = max_connections, timeout, retries, backoff
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session = None  # made on the first request, inside the event loop that uses it
        self._jitter = random.Random(0)

    def _client(self):
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self._headers, timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(limit=self.max_connections))
        return self._session

    async def generate(self, messages, config=GenerateConfig()) -> Output:
        import aiohttp

        body = {"model": self.model, "messages": list(messages), "max_tokens": config.max_tokens,
                "temperature": config.temperature}
        for attempt in range(self.retries + 1):
            wait = None
            try:
                async with self._client().post(self.url, json=body) as response:
                    text = await response.text()
                    if response.status == 200:
                        return self._output(text)
                    problem = f"HTTP {response.status}: {_error_message(text)}"
                    if response.status != 429 and response.status < 500:
                        raise TargetError(f"{self.url}: {problem}")
                    wait = _retry_after(response.headers.get("retry-after"))
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                problem = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if attempt < self.retries:
                delay = wait if wait is not None else self.backoff * 2**attempt * (0.75 + 0.5 * self._jitter.random())
                await asyncio.sleep(delay)
        raise TargetError(f"{self.url}: {problem} (after {self.retries + 1} attempts)")

    def _output(self, text: str) -> Output:
        try:
            data = json.loads(text)
            choice = data["choices"][0]
            content = choice["message"].get("content") or ""
            reason = choice.get("finish_reason") or "stop"
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise TargetError(f"{self.url}: the answer is not a chat completion: {text[:200]!r}") from None
        meta = {"guard": data["safetylab"]} if isinstance(data.get("safetylab"), dict) else {}
        return Output(content, {"length": "max_tokens"}.get(reason, reason), data.get("model", self.model), meta)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _error_message(text: str) -> str:
    try:
        return str(json.loads(text)["error"]["message"])[:300]
    except Exception:  # noqa: BLE001 - any body: show its start
        return text[:300]


def _retry_after(header: str | None) -> float | None:
    try:
        return min(60.0, max(0.0, float(header or "")))
    except ValueError:
        return None


__all__ = ["FunctionTarget", "GenerateConfig", "GuardedTarget", "LocalTarget", "OpenAITarget", "Output", "Target",
           "TargetError"]
