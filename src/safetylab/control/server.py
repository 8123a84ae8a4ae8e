"""The guarded server: an OpenAI-compatible chat API with the guard around the model, an audit record for
every decision, tripwires, a kill switch and a human review page.

Routes (every one needs a key, ``Authorization: Bearer sl-…``, except the review page's login form):

- ``POST /v1/chat/completions``, ``GET /v1/models`` (role ``user``): OpenAI's shapes, so the ``openai`` client
  and anything built on it talk to the server unchanged; the answer carries a ``safetylab`` field with the
  guard's decision, the review id of an escalation and the audit record's sequence number;
- ``GET /v1/reviews/{id}`` (the key that asked): an escalated request's outcome once a person decided;
- ``GET /admin/status``, ``POST /admin/halt``, ``POST /admin/release``, ``POST /admin/keys/{name}/unlock``
  (role ``admin``): the kill switch and locked keys;
- ``GET /review`` (the page), ``POST /review/login``, ``POST /review/logout``, ``GET /review/api/queue``,
  ``POST /review/api/{id}``, ``GET /review/api/log`` (role ``reviewer``; the page's session cookie or a key).

A request goes: kill switch (503 with the reason while halted) → key (401 without a valid one, 403 for a locked
key or a role too low) → rate limit (429) → the input layers on the user's messages → the model → the output
layers → tripwires; escalations are held for review (the client gets a notice and the review id) unless
``escalation="pass"``. The exchange's audit record is committed before the response is sent, so every answer
a client received is in the log, even if the server is killed the next instant.
"""

from __future__ import annotations

import asyncio
import html
import itertools
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Form, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from safetylab.control.guard import REFUSAL, STOPS, Guard, delivery
from safetylab.control.state import Key, State
from safetylab.control.tripwires import Tripwires
from safetylab.core.config import require, require_choice
from safetylab.core.errors import SafetylabError

Generate = Callable[[str, int, float], tuple[str, str]]  # (prompt, max_tokens, temperature) -> (text, finish)
COOKIE = "safetylab_review"
ReviewId = Annotated[int, Path(ge=1, le=2**63 - 1, description="A review's id.")]


@dataclass(frozen=True)
class ServerConfig:
    """``model_name`` as ``/v1/models`` lists it; ``max_body_bytes`` per request; ``max_tokens_limit`` on a
    request's ``max_tokens`` (``default_max_tokens`` when it gives none); ``escalation``: ``hold`` an escalated
    answer for review or ``pass`` it on and review it afterwards; ``refusal``: the answer to a blocked request."""

    model_name: str = "safetylab-world"
    max_body_bytes: int = 64 * 1024
    max_messages: int = 64
    default_max_tokens: int = 48
    max_tokens_limit: int = 512
    escalation: str = "hold"
    refusal: str = REFUSAL
    log_text: bool = True

    def __post_init__(self):
        for name in ("max_body_bytes", "max_messages", "default_max_tokens", "max_tokens_limit"):
            require(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "an integer >= 1",
                    getattr(self, name))
        require(self.default_max_tokens <= self.max_tokens_limit, "default_max_tokens",
                f"at most max_tokens_limit ({self.max_tokens_limit})", self.default_max_tokens)
        require_choice(self.escalation, "escalation", ("hold", "pass"))


# ----------------------------------------------------------------------------- request and response shapes
class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str = Field(max_length=1_000_000)


class ChatRequest(BaseModel):
    """OpenAI's chat-completion request; fields the server does not use (top_p, user, …) are accepted and
    ignored, as OpenAI-compatible servers do; ``stream`` and ``n`` > 1 are refused."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    n: int | None = Field(default=None, ge=1, le=1)
    stream: bool | None = False


class HaltRequest(BaseModel):
    reason: str = Field(min_length=1, max_length=500)


class ReviewDecision(BaseModel):
    decision: Literal["approve", "reject", "edit"]
    edited: str | None = Field(default=None, max_length=100_000)
    note: str | None = Field(default=None, max_length=2000)


class ApiError(Exception):
    """An error answered in OpenAI's shape ``{"error": {"message", "type", "code"}}``."""

    def __init__(self, status: int, message: str, code: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers


# ----------------------------------------------------------------------------- rate limits
class RateLimiter:
    """A token bucket per key: ``rate_per_minute`` tokens refilled continuously, as many held at most (a
    minute's burst); a request takes one. Thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock, self._buckets, self._lock = clock, {}, threading.Lock()

    def take(self, name: str, rate_per_minute: float) -> float:
        """0 when the request may go on, else the seconds until a token is back."""
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.get(name, (rate_per_minute, now))
            tokens = min(rate_per_minute, tokens + (now - last) * rate_per_minute / 60)
            if tokens >= 1:
                self._buckets[name] = (tokens - 1, now)
                return 0.0
            self._buckets[name] = (tokens, now)
            return (1 - tokens) * 60 / rate_per_minute


# ----------------------------------------------------------------------------- the model
def model_generator(model, tokenizer, seed: int = 0) -> Generate:
    """``generate(prompt, max_tokens, temperature)`` with the world's sampler (greedy at temperature 0), one
    request at a time (the model is not shared between threads)."""
    import torch

    from safetylab.models.sampling import sample

    lock = threading.Lock()

    def generate(prompt: str, max_tokens: int, temperature: float) -> tuple[str, str]:
        with lock, torch.inference_mode():
            out = sample(model, tokenizer, [prompt], max_new_tokens=max_tokens, temperature=temperature or 1.0,
                         greedy=temperature == 0)
        return out.texts[0], "stop" if bool(out.finished[0]) else "length"

    generate.blocking = True
    return generate


def echo_generator(prompt: str, max_tokens: int, temperature: float) -> tuple[str, str]:
    """A no-op model that answers with the prompt's first ``max_tokens`` words (for tests and benchmarks)."""
    words = prompt.split()
    return " ".join(words[:max_tokens]), "stop" if len(words) <= max_tokens else "length"


echo_generator.blocking = False


# ----------------------------------------------------------------------------- group commit on the event loop
class LoopCommitter:
    """Commits a server's audit records on its event loop: the records the requests of one loop iteration
    append are committed together (``log.flush()``, one transaction) at the end of that iteration, and each
    request awaits its own. No thread hand-off on a request's path: a hand-off waits for the writer thread to
    get a core, which on a busy machine costs more than the commit. A batch that fails to commit fails the
    requests whose records it held (fail closed: no answer without its record)."""

    def __init__(self, log):
        self.log, self._waiting = log, []  # a log opened with writer=False leaves every commit to this

    async def commit(self, kind: str, data: dict[str, Any]):
        record = self.log.append(kind, data)
        loop = asyncio.get_running_loop()
        if not self._waiting:
            loop.call_soon(self._flush)
        committed = loop.create_future()  # one per request: a request cancelled while it waits cancels only its own
        self._waiting.append(committed)
        await committed
        return record.result()

    def _flush(self) -> None:
        waiting, self._waiting = self._waiting, []
        try:
            self.log.flush()
        except Exception:  # noqa: BLE001 - the records' own futures hold the error; the waiters read it from them
            pass
        for committed in waiting:
            if not committed.done():
                committed.set_result(None)


# ----------------------------------------------------------------------------- the server
class Server:
    """The guarded model: ``guard`` around ``generate``, decisions in ``log`` (an audit log whose ``append``
    returns a future), keys, the kill switch and reviews in ``state``. A request runs in a worker thread when
    the model or a guard layer is a model (``blocking``: a generator without the attribute counts as one), on
    the event loop otherwise — a thread hop costs more than rules and a linear classifier."""

    def __init__(self, generate: Generate, guard: Guard, log, state: State, config: ServerConfig = ServerConfig(),
                 tripwires: Tripwires | None = None):
        self.generate, self.guard, self.log, self.state, self.config = generate, guard, log, state, config
        self.tripwires = tripwires if tripwires is not None else Tripwires(guard.wires)
        self.limiter = RateLimiter()
        self.blocking = getattr(generate, "blocking", True) or guard.blocking
        self.sessions: dict[str, str] = {}  # review-page session id -> the key it signed in with
        self.committer = LoopCommitter(log)
        # request ids: a random prefix per server and a counter (uuid4 reads the OS's random source each time,
        # 70 µs on this VM: a fifth of a request)
        self._ids, self._count = secrets.token_hex(8), itertools.count()

    # --------------------------------------------------------------- authentication
    def authorise(self, token: str | None, role: str) -> Key:
        if not token:
            raise ApiError(401, "missing API key: send Authorization: Bearer <key>", "missing_api_key")
        key = self.state.key(token)
        if key is None:
            raise ApiError(401, "invalid API key", "invalid_api_key")
        if key.locked:
            raise ApiError(403, f"this key is locked ({key.locked_reason}); an admin can unlock it", "key_locked")
        if not key.allows(role):
            raise ApiError(403, f"this route needs the {role} role; the key has {key.role}", "forbidden")
        wait = self.limiter.take(key.name, key.rate_per_minute)
        if wait > 0:
            raise ApiError(429, f"rate limit of {key.rate_per_minute:g} requests a minute reached; retry in "
                                f"{wait:.1f} s", "rate_limited", {"Retry-After": str(max(1, round(wait)))})
        return key

    # --------------------------------------------------------------- a chat completion
    def complete(self, key: Key, request: ChatRequest) -> tuple[dict[str, Any], dict[str, Any]]:
        """The response body and the audit record of one chat completion (the record is committed by the
        caller before the response is sent)."""
        switch = self.state.switch()
        if switch.halted:
            raise ApiError(503, f"serving is halted: {switch.reason}", "halted")
        if request.stream:
            raise ApiError(400, "stream: streaming is not supported; send stream=false", "unsupported")
        if request.model != self.config.model_name:
            raise ApiError(404, f"model {request.model!r} does not exist; this server serves "
                                f"{self.config.model_name!r}", "model_not_found")
        if len(request.messages) > self.config.max_messages:
            raise ApiError(400, f"messages: {len(request.messages)} messages, over the limit of "
                                f"{self.config.max_messages}", "too_many_messages")
        users = [m.content for m in request.messages if m.role == "user"]
        if not users:
            raise ApiError(400, "messages: no user message to answer", "invalid_messages")
        max_tokens = request.max_completion_tokens or request.max_tokens or self.config.default_max_tokens
        if max_tokens > self.config.max_tokens_limit:
            raise ApiError(400, f"max_tokens: {max_tokens}, over the limit of {self.config.max_tokens_limit}",
                           "max_tokens_too_large")
        temperature = 1.0 if request.temperature is None else request.temperature
        start = time.perf_counter()
        # the input layers see every message the model's answer could follow, the model answers the last turn
        checked = "\n".join(m.content for m in request.messages if m.role != "assistant")
        verdicts = [self.guard.check_input(checked)]
        # a layer that modified the conversation (stripped, redacted) modifies the answered message the same way
        prompt = users[-1] if verdicts[0].text == checked else self.guard.check_input(users[-1]).text
        response, finish = None, "content_filter"
        if verdicts[0].allowed:
            response, finish = self.generate(prompt, max_tokens, temperature)
            verdicts.append(self.guard.check_output(prompt, response))
            response = verdicts[-1].text
        decision, content = delivery(verdicts, self.config.refusal, self.config.escalation == "hold")
        if decision in STOPS or content is None:
            finish = "content_filter"
        trips = self.act_on_trips(self.tripwires.observe(key.name, *verdicts))
        if any(v.decision == "halt" for v in verdicts):
            self.state.halt(f"guard: {next(v.reason for v in verdicts if v.decision == 'halt')}", "guard")
        review_id, layers = None, [v.to_dict() for v in verdicts]
        if decision == "escalate":
            context = {"verdicts": layers, "model": request.model}
            review_id = self.state.enqueue(prompt, response, context, key.name)
        if content is None:  # held for review
            content = f"this request is waiting for a human review (review {review_id}) ."
        latency = (time.perf_counter() - start) * 1000
        created, rid = int(time.time()), f"chatcmpl-{self._ids}{next(self._count):x}"
        body = {"id": rid, "object": "chat.completion", "created": created, "model": request.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": finish}],
                "usage": usage(checked, content),
                "safetylab": {"decision": decision, "review_id": review_id,
                              "reason": next((v.reason for v in verdicts if v.decision == decision), "")}}
        record = {"request": rid, "key": key.name, "model": request.model, "decision": decision,
                  "verdicts": layers, "review": review_id,
                  "trips": [t.to_dict() for t in trips], "latency_ms": round(latency, 3)}
        if self.config.log_text:
            record.update(prompt=prompt, response=response, answer=content)
        return body, record

    def act_on_trips(self, trips) -> list:
        for trip in trips:
            if trip.action == "halt":
                self.state.halt(f"tripwire {trip.wire}: {trip.reason}", f"tripwire:{trip.wire}")
            elif trip.key is not None:
                self.state.lock_key(trip.key, f"tripwire {trip.wire}: {trip.reason}")
        return trips

    def outcome(self, key: Key, review_id: int) -> dict[str, Any]:
        """An escalated request's outcome for the key that sent it."""
        from safetylab.core.errors import SafetylabError

        try:
            review = self.state.review(review_id)
        except SafetylabError:
            raise ApiError(404, f"no review {review_id}", "not_found") from None
        if review.key_name != key.name and not key.allows("reviewer"):
            raise ApiError(404, f"no review {review_id}", "not_found")
        content = {"approved": review.response, "edited": review.edited,
                   "rejected": self.config.refusal}.get(review.status)
        return {"id": review.id, "status": review.status, "content": content}


def usage(prompt: str, completion: str) -> dict[str, int]:
    """Token counts as words (the world's tokenizer is word-level)."""
    p, c = len(prompt.split()), len(completion.split())
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


# ----------------------------------------------------------------------------- the app
class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes (by its Content-Length, or counted as it streams
    in) is answered 413 before the app reads it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await too_large(self.limit)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise ApiError(413, f"request body over {self.limit} bytes", "request_too_large")
            return message

        return await self.app(scope, limited, send)


def too_large(limit: int) -> JSONResponse:
    return error_response(ApiError(413, f"request body over {limit} bytes (or an invalid Content-Length)",
                                   "request_too_large"))


def error_response(e: ApiError) -> JSONResponse:
    kind = "invalid_request_error" if e.status < 500 else "server_error"
    return JSONResponse({"error": {"message": e.message, "type": kind, "code": e.code}}, e.status, headers=e.headers)


def create_app(server: Server) -> FastAPI:
    """The FastAPI app of ``server`` (run it with uvicorn; ``safetylab serve`` does)."""
    login_html, review_html = page("login.html"), page("review.html")
    app = FastAPI(title="safetylab guarded model server", version="1",
                  description="An OpenAI-compatible chat API behind a safetylab guard, with an audit log, "
                              "tripwires, a kill switch and human review.")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return error_response(e)

    @app.exception_handler(HTTPException)  # Starlette's: unknown routes, methods and bodies that do not parse
    async def http_error(request: Request, e: HTTPException):
        return error_response(ApiError(e.status_code, str(e.detail), "http_error", getattr(e, "headers", None)))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return error_response(ApiError(400, f"{where}: {first.get('msg', 'invalid value')}", "invalid_request"))

    # dependencies are async so that FastAPI calls them on the event loop, not through its thread pool
    def role(name: str):
        async def check(request: Request) -> Key:
            return server.authorise(bearer(request), name)
        return check

    async def reviewer(request: Request) -> Key:
        token = bearer(request)
        if token is None and (session := request.cookies.get(COOKIE)) in server.sessions:
            token = server.sessions[session]
        return server.authorise(token, "reviewer")

    async def commit(kind: str, data: dict[str, Any]) -> int:
        try:
            return (await server.committer.commit(kind, data)).seq
        except SafetylabError as e:  # fail closed: no answer without its record
            raise ApiError(500, f"the audit log could not record this request, so it is not answered ({e})",
                           "audit_log_unavailable") from None

    # ------------------------------------------------------------------ the API
    # The body is parsed here, straight from its bytes (pydantic's JSON parser), not by FastAPI from a dict:
    # a fifth of the framework's time per request. The spec still gives its schema.
    @app.post("/v1/chat/completions", openapi_extra={"requestBody": {
        "required": True, "content": {"application/json": {"schema": inline_schema(ChatRequest)}}}})
    async def chat(request: Request):
        key = server.authorise(bearer(request), "user")  # here, not a dependency: FastAPI's solving costs 0.1 ms
        try:
            body = ChatRequest.model_validate_json(await request.body())
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None
        if server.blocking:
            response, record = await run_in_threadpool(server.complete, key, body)
        else:
            response, record = server.complete(key, body)
        response["safetylab"]["audit_seq"] = await commit("exchange", record)
        for trip in record["trips"]:
            await commit("trip", {**trip, "request": record["request"]})
        return JSONResponse(response)

    @app.get("/v1/models")
    async def models(key: Key = Depends(role("user"))):
        return {"object": "list", "data": [{"id": server.config.model_name, "object": "model", "created": 0,
                                            "owned_by": "safetylab"}]}

    @app.get("/v1/reviews/{review_id}")
    async def review_outcome(review_id: ReviewId, key: Key = Depends(role("user"))):
        return server.outcome(key, review_id)

    # ------------------------------------------------------------------ admin
    @app.get("/admin/status")
    async def status(key: Key = Depends(role("admin"))):
        return {"switch": server.state.switch().to_dict(), "pending_reviews": len(server.state.reviews()),
                "locked_keys": [k.name for k in server.state.keys() if k.locked],
                "guard": server.guard.describe()}

    @app.post("/admin/halt")
    async def halt(body: HaltRequest, key: Key = Depends(role("admin"))):
        switch = server.state.halt(body.reason, key.name)
        await commit("halt", {"by": key.name, "reason": body.reason})
        return switch.to_dict()

    @app.post("/admin/release")
    async def release(key: Key = Depends(role("admin"))):
        before = server.state.switch()
        switch = server.state.release(key.name)
        await commit("release", {"by": key.name, "was": before.reason})
        return switch.to_dict()

    @app.post("/admin/keys/{name}/unlock")
    async def unlock(name: Annotated[str, Path(max_length=64)], key: Key = Depends(role("admin"))):
        from safetylab.core.errors import SafetylabError

        try:
            server.state.unlock_key(name)
        except SafetylabError as e:
            raise ApiError(404, str(e), "not_found") from None
        await commit("unlock", {"by": key.name, "key": name})
        return {"unlocked": name}

    # ------------------------------------------------------------------ human review
    @app.get("/review", response_class=HTMLResponse, include_in_schema=False)
    async def review_page(request: Request):
        key = server.state.key(server.sessions.get(request.cookies.get(COOKIE, ""), ""))
        if key is None or key.locked or not key.allows("reviewer"):
            return HTMLResponse(login_html)
        return HTMLResponse(review_html.replace("{{name}}", html.escape(key.name)))

    @app.post("/review/login", include_in_schema=False)
    async def login(key: str = Form(..., max_length=200)):
        found = server.state.key(key)
        if found is None or found.locked or not found.allows("reviewer"):
            return HTMLResponse(login_html.replace("<!--error-->", '<p class="error">That key cannot review.</p>'),
                                status_code=401)
        session = secrets.token_urlsafe(32)
        server.sessions[session] = key
        response = RedirectResponse("/review", status_code=303)
        response.set_cookie(COOKIE, session, httponly=True, samesite="strict")
        return response

    @app.post("/review/logout", include_in_schema=False)
    async def logout(request: Request):
        server.sessions.pop(request.cookies.get(COOKIE, ""), None)
        response = RedirectResponse("/review", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    @app.get("/review/api/queue")
    async def queue(status: Literal["pending", "approved", "rejected", "edited"] = "pending",
                    key: Key = Depends(reviewer)):
        return {"reviews": [r.to_dict() for r in server.state.reviews(status)]}

    @app.post("/review/api/{review_id}")
    async def decide(review_id: ReviewId, body: ReviewDecision, key: Key = Depends(reviewer)):
        from safetylab.core.errors import SafetylabError

        try:
            review = server.state.decide(review_id, body.decision, key.name, body.edited, body.note)
        except SafetylabError as e:
            status = 404 if "no review" in str(e) else 409 if "already" in str(e) else 400
            raise ApiError(status, str(e), "review_error") from None
        seq = await commit("review", {"review": review_id, "decision": body.decision, "by": key.name,
                                      "note": body.note, "edited": body.edited})
        return {**review.to_dict(), "audit_seq": seq}

    @app.get("/review/api/log")
    async def recent(limit: Annotated[int, Query(ge=1, le=200)] = 20, key: Key = Depends(reviewer)):
        server.log.flush()
        total = server.log.count()
        return {"records": [record_dict(r) for r in server.log.records(max(1, total - limit + 1))]}

    return BodyLimitApp(app, server.config.max_body_bytes)


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its ``$defs`` written in place (in an OpenAPI document a ``$ref`` resolves
    from the document's root, where those definitions are not)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            return inline(defs[node["$ref"].rsplit("/", 1)[1]]) if "$ref" in node else \
                {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node

    return inline(schema)


def page(name: str) -> str:
    """An HTML page shipped with the package (``control/templates``)."""
    return resources.files("safetylab.control").joinpath("templates", name).read_text(encoding="utf-8")


def record_dict(record) -> dict[str, Any]:
    return {"seq": record.seq, "time": record.time, "kind": record.kind, "data": record.data, "hash": record.hash}


class BodyLimitApp(BodyLimit):
    """The app behind its body limit, with the app's attributes (``openapi``, ``routes``, …) passed through."""

    def __getattr__(self, name):
        return getattr(self.app, name)


__all__ = ["ApiError", "ChatRequest", "RateLimiter", "Server", "ServerConfig", "create_app", "echo_generator",
           "model_generator"]
