"""The server's state in one SQLite file: API keys, the kill switch and the human review queue.

- **Keys** are random tokens (``sl-`` + 32 URL-safe bytes) shown once at creation and stored as their SHA-256
  (a key has 256 bits of entropy, so a fast hash is the right one, as for GitHub's tokens — a slow password hash
  would only slow every request), each with a role — ``user`` < ``reviewer`` < ``admin`` — a rate limit and a
  ``locked`` flag a tripwire can set.
- **The kill switch** is one row: halted or not, why, by whom, since when. It survives restarts, so a halted
  server comes back halted; only an admin key can pull or release it.
- **Reviews**: each escalated exchange with its context (prompt, response, every layer's result) waits for a
  reviewer to approve, reject or edit it; :meth:`State.export_reviews` writes the decided ones as labelled
  JSONL for retraining the guard's classifier.

Several server processes on one machine may share the file (SQLite's locking; WAL mode). Each process reads a
key and the kill switch from the file at most once a ``ttl`` (1 s): a change made in this process takes effect
at once, one made by another process within ``ttl`` seconds.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetylab.core.config import require, require_choice
from safetylab.core.errors import SafetylabError
from safetylab.core.io import atomic_write_text

ROLES = ("user", "reviewer", "admin")
RANK = {r: i for i, r in enumerate(ROLES)}
REVIEW_DECISIONS = ("approve", "reject", "edit")
PREFIX = "sl-"

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, role TEXT NOT NULL, hash TEXT NOT NULL UNIQUE,
    rate_per_minute REAL NOT NULL, locked INTEGER NOT NULL DEFAULT 0, locked_reason TEXT, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS switch (
    id INTEGER PRIMARY KEY CHECK (id = 1), halted INTEGER NOT NULL, reason TEXT, by TEXT, since REAL);
CREATE TABLE IF NOT EXISTS reviews (
    id INTEGER PRIMARY KEY, created REAL NOT NULL, key_name TEXT, prompt TEXT NOT NULL, response TEXT,
    context TEXT NOT NULL, status TEXT NOT NULL DEFAULT 'pending', reviewer TEXT, edited TEXT, note TEXT,
    decided REAL);
INSERT OR IGNORE INTO switch (id, halted) VALUES (1, 0);
"""


@dataclass(frozen=True)
class Key:
    id: int
    name: str
    role: str
    rate_per_minute: float
    locked: bool
    locked_reason: str | None = None

    def allows(self, role: str) -> bool:
        """Whether this key's role is ``role`` or above."""
        return RANK[self.role] >= RANK[role]


@dataclass(frozen=True)
class Switch:
    halted: bool
    reason: str | None = None
    by: str | None = None
    since: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"halted": self.halted, "reason": self.reason, "by": self.by, "since": self.since}


@dataclass(frozen=True)
class Review:
    id: int
    created: float
    key_name: str | None
    prompt: str
    response: str | None
    context: dict[str, Any]
    status: str
    reviewer: str | None
    edited: str | None
    note: str | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class State:
    """The state file at ``path`` (made if missing); ``ttl`` seconds of caching keys and the kill switch."""

    def __init__(self, path: str | Path, ttl: float = 1.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise SafetylabError(f"{self.path}: not a safetylab state file ({e})") from None
        self._lock = threading.Lock()
        self.ttl, self._keys, self._switch = float(ttl), {}, None  # cache: hash -> (key, until); (switch, until)

    def _changed(self) -> None:
        self._keys, self._switch = {}, None

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def close(self) -> None:
        self._db.close()

    # ------------------------------------------------------------------ keys
    def add_key(self, name: str, role: str, rate_per_minute: float = 60.0) -> str:
        """A new key for ``name`` with ``role``; the token is returned once and only its hash is kept."""
        require(isinstance(name, str) and 0 < len(name) <= 64, "name", "a name of 1 to 64 characters", name)
        require_choice(role, "role", ROLES)
        require(rate_per_minute > 0, "rate_per_minute", "a number > 0", rate_per_minute)
        token = PREFIX + secrets.token_urlsafe(32)
        try:
            self._query("INSERT INTO keys (name, role, hash, rate_per_minute, created) VALUES (?, ?, ?, ?, ?)",
                        (name, role, hash_key(token), float(rate_per_minute), time.time()))
        except sqlite3.IntegrityError:
            raise SafetylabError(f"a key named {name!r} exists already; choose another name or revoke it") from None
        return token

    def key(self, token: str) -> Key | None:
        """The key whose token is ``token``, or None."""
        if not isinstance(token, str) or not token.startswith(PREFIX):
            return None
        digest, now = hash_key(token), time.monotonic()
        cached = self._keys.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        rows = self._query("SELECT id, name, role, rate_per_minute, locked, locked_reason FROM keys WHERE hash = ?",
                           (digest,))
        key = Key(*rows[0][:4], bool(rows[0][4]), rows[0][5]) if rows else None
        if len(self._keys) > 10_000:
            self._keys = {}
        self._keys[digest] = (key, now + self.ttl)
        return key

    def keys(self) -> list[Key]:
        rows = self._query("SELECT id, name, role, rate_per_minute, locked, locked_reason FROM keys ORDER BY id")
        return [Key(*r[:4], bool(r[4]), r[5]) for r in rows]

    def lock_key(self, name: str, reason: str) -> None:
        self._query("UPDATE keys SET locked = 1, locked_reason = ? WHERE name = ?", (reason, name))
        self._changed()

    def unlock_key(self, name: str) -> None:
        if not self._query("SELECT 1 FROM keys WHERE name = ?", (name,)):
            raise SafetylabError(f"no key named {name!r}")
        self._query("UPDATE keys SET locked = 0, locked_reason = NULL WHERE name = ?", (name,))
        self._changed()

    def revoke_key(self, name: str) -> None:
        if not self._query("SELECT 1 FROM keys WHERE name = ?", (name,)):
            raise SafetylabError(f"no key named {name!r}")
        self._query("DELETE FROM keys WHERE name = ?", (name,))
        self._changed()

    # ------------------------------------------------------------------ kill switch
    def switch(self) -> Switch:
        now = time.monotonic()
        if self._switch is not None and self._switch[1] > now:
            return self._switch[0]
        halted, reason, by, since = self._query("SELECT halted, reason, by, since FROM switch WHERE id = 1")[0]
        self._switch = (Switch(bool(halted), reason, by, since), now + self.ttl)
        return self._switch[0]

    def halt(self, reason: str, by: str) -> Switch:
        """Pull the kill switch (a second pull keeps the first reason)."""
        self._query("UPDATE switch SET halted = 1, reason = ?, by = ?, since = ? WHERE id = 1 AND halted = 0",
                    (reason, by, time.time()))
        self._changed()
        return self.switch()

    def release(self, by: str) -> Switch:
        self._query("UPDATE switch SET halted = 0, reason = NULL, by = ?, since = ? WHERE id = 1", (by, time.time()))
        self._changed()
        return self.switch()

    # ------------------------------------------------------------------ reviews
    def enqueue(self, prompt: str, response: str | None, context: dict[str, Any], key_name: str | None) -> int:
        """Queue an escalated exchange for review; its id."""
        with self._lock:
            cursor = self._db.execute("INSERT INTO reviews (created, key_name, prompt, response, context) "
                                      "VALUES (?, ?, ?, ?, ?)",
                                      (time.time(), key_name, prompt, response, json.dumps(context)))
            return cursor.lastrowid

    def reviews(self, status: str | None = "pending", limit: int = 100) -> list[Review]:
        where, args = ("WHERE status = ?", (status,)) if status else ("", ())
        rows = self._query(f"SELECT id, created, key_name, prompt, response, context, status, reviewer, edited, note "
                           f"FROM reviews {where} ORDER BY id LIMIT ?", (*args, int(limit)))
        return [Review(*r[:5], json.loads(r[5]), *r[6:]) for r in rows]

    def review(self, review_id: int) -> Review:
        rows = self._query("SELECT id, created, key_name, prompt, response, context, status, reviewer, edited, note "
                           "FROM reviews WHERE id = ?", (int(review_id),))
        if not rows:
            raise SafetylabError(f"no review {review_id}")
        r = rows[0]
        return Review(*r[:5], json.loads(r[5]), *r[6:])

    def decide(self, review_id: int, decision: str, reviewer: str, edited: str | None = None,
               note: str | None = None) -> Review:
        """Record a reviewer's ``decision`` (approve, reject, or edit with the ``edited`` response) on a pending
        review; a decided review cannot be decided again."""
        require_choice(decision, "decision", REVIEW_DECISIONS)
        if decision == "edit" and not (isinstance(edited, str) and edited.strip()):
            raise SafetylabError("decision edit: give the edited response")
        status = {"approve": "approved", "reject": "rejected", "edit": "edited"}[decision]
        with self._lock:
            cursor = self._db.execute("UPDATE reviews SET status = ?, reviewer = ?, edited = ?, note = ?, decided = ? "
                                      "WHERE id = ? AND status = 'pending'",
                                      (status, reviewer, edited if decision == "edit" else None, note, time.time(),
                                       int(review_id)))
        if cursor.rowcount == 0:
            current = self.review(review_id)  # raises when there is none
            raise SafetylabError(f"review {review_id} was {current.status} already by {current.reviewer}")
        return self.review(review_id)

    def decided(self) -> Iterator[Review]:
        yield from (r for r in self.reviews(None, limit=2**62) if r.status != "pending")

    def export_reviews(self, path: str | Path) -> int:
        """Write the decided reviews as JSONL — ``{"prompt", "response", "label", "decision", "reviewer", "id"}``,
        ``label`` 1 (harmful: the reviewer rejected it) or 0 (approved, or approved as edited, the edited
        response in ``response``) — atomically; the number written."""
        lines = []
        for r in self.decided():
            response = r.edited if r.status == "edited" else r.response
            lines.append(json.dumps({"prompt": r.prompt, "response": response,
                                     "label": int(r.status == "rejected"), "decision": r.status,
                                     "reviewer": r.reviewer, "id": r.id}, ensure_ascii=False))
        atomic_write_text(path, "".join(line + "\n" for line in lines))
        return len(lines)


__all__ = ["Key", "PREFIX", "REVIEW_DECISIONS", "ROLES", "Review", "State", "Switch", "hash_key"]
