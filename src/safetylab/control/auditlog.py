"""The tamper-evident audit log of the guarded server: append-only, hash-chained, committed in batches.

**Records.** A record's *body* is the canonical JSON encoding (:func:`canonical`) of
``{"data", "kind", "seq", "time"}``: ``seq`` counts from 1 without gaps, ``time`` is ISO 8601 UTC to the
microsecond (``2025-01-31T12:00:00.000000Z``, when the record's batch was written, so times never decrease
along a chain written by one clock), ``kind`` names the event and ``data`` is any JSON value. The stored
body bytes are the single source of truth: reading a record parses them, verifying one re-hashes them
(nothing is ever encoded again, so no encoder change can break an old log).

**Chain.** ``h_n = SHA-256(bytes.fromhex(h_{n-1}) || body_n)`` with ``h_0`` = 64 zeros
(:func:`chain_hash`). Each row holds ``seq``, ``prev`` (``h_{n-1}``, hex), ``hash`` (``h_n``, hex) and the
body. :meth:`AuditLog.verify` names the first record that was altered (its hash does not match its body),
removed (a gap in ``seq``), reordered (``prev`` is not the previous row's hash, or the body's ``seq`` is not
the row's). A chain alone cannot show that its tail was cut off: keep :meth:`AuditLog.head` somewhere else
(a second machine, a signed report) and pass it back as ``verify(expected_head=...)``.

**Group commit.** :meth:`AuditLog.append` encodes the record at once (bad data is refused there, in the
caller's thread) and returns a :class:`concurrent.futures.Future`; a writer thread commits whatever is
pending, up to ``batch`` records per transaction, as soon as anything is pending — a lone record is written
at once, a burst in batches. The future resolves with the committed :class:`AuditRecord` only after its
transaction has committed, so a server that answers a request after ``future.result()`` has its record on
disk (or in the database) whatever happens to the process afterwards. A batch that fails to commit fails
every future in it (and the next :meth:`AuditLog.flush`); the log stays usable and the next batch retries
from the stored head. An ``append`` that finds ``max_pending`` records waiting commits a batch itself before
it returns: memory stays bounded, and a caller appending in a tight loop does the writing in its own thread
instead of handing every batch to another thread through the interpreter lock (which, with SQLite
releasing that lock on every statement, would cost a thread switch or more per batch).

**Backends.** :class:`SQLiteAuditLog` (embedded, the default) and :class:`PostgresAuditLog` (several server
processes on several machines), behind one interface, :class:`AuditLog`; :func:`open_audit_log` picks one
from a path or a DSN. Several processes may append to one log: each batch takes the log's write lock
(SQLite ``BEGIN IMMEDIATE``, PostgreSQL ``LOCK TABLE ... IN EXCLUSIVE MODE``, which still lets readers in)
and reads the head inside that transaction, so the chain never forks; ``seq`` is the primary key besides.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, InvalidStateError
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

from safetylab.core.errors import SafetylabError

ZERO_HASH = "0" * 64  # h_0, the "previous hash" of record 1
TIME_LENGTH = len("2025-01-31T12:00:00.000000Z")
FORMAT_VERSION = 1  # the SQLite file's user_version
APPLICATION_ID = int.from_bytes(b"slau", "big")  # PRAGMA application_id of safetylab audit-log files
FETCH_ROWS = 2_000  # rows per query when reading or verifying (larger lists read slower)
MAX_DEPTH = 500  # nesting levels of a record's data
MAX_KINDS = 1024  # kinds whose encoding a log keeps
HELPER_BATCH = 48  # default max_pending: records in flight stay under 700 garbage-collected objects
HELPER_GRACE = 0.01  # seconds the writer leaves a log alone after an append committed a batch itself
INSERT_ROWS = 100  # rows per SQLite INSERT statement (4 parameters each, far below SQLite's limit)
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_TIME_MARK = b',"time":"'
_AFTER_TIME_MARK = TIME_LENGTH + 2  # every body ends with ,"time":"<TIME_LENGTH characters>"}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_DSN_KEYS = re.compile(r"\s*(host|hostaddr|port|dbname|user|password|passfile|service|options|sslmode|"
                       r"application_name|connect_timeout|target_session_attrs)\s*=")


# ----------------------------------------------------------------------------- encoding and hashing
def _refuse(obj: Any) -> Any:
    raise TypeError(f"{type(obj).__name__} is not JSON")


def _fast_encoder():
    """``json``'s C encoder with :data:`_ENCODER`'s settings, made once and without the circular-reference
    markers (a cycle ends in a RecursionError instead): ``JSONEncoder.encode`` builds one per call, which is
    a third of the cost of encoding a small record. ``_ENCODER.encode`` where the C encoder is missing or
    encodes differently."""
    try:
        from json.encoder import c_make_encoder, encode_basestring

        make = c_make_encoder(None, _refuse, encode_basestring, None, ":", ",", True, False, False)
        sample = {"b": [1.5, "é\n", None, True], "a": {"z": -0, "y": 10**20}}
        if "".join(make(sample, 0)) == _ENCODER.encode(sample):
            return lambda obj: "".join(make(obj, 0))
    except Exception:  # noqa: BLE001 - any difference in the private API: use the public one
        pass
    return _ENCODER.encode


_encode_json = _fast_encoder()


def canonical(obj: Any, where: str = "data") -> bytes:
    """The canonical encoding of a JSON value: UTF-8 JSON, keys sorted, separators ``,`` and ``:``, no
    whitespace, non-ASCII characters as themselves (RFC 8785's layout, with Python's shortest float repr).

    Only JSON values: dicts with string keys, lists (tuples are written as lists), strings, ints, finite
    floats, booleans and None. Anything else — NaN or infinity, a non-string key (``{1: …}`` would read back
    as ``{"1": …}`` in another key order), a set, bytes, a datetime, a string with a lone surrogate — is a
    :class:`SafetylabError` naming the path of the offending field (``data.scores[2]``). Equal values encode
    to equal bytes whatever the order their keys were inserted in, and
    ``canonical(json.loads(canonical(x))) == canonical(x)``.
    """
    try:
        text = _encode_json(obj)
        if _string_keys(obj, text):
            return text.encode("utf-8")
    except (TypeError, ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
        pass
    path, problem = _first_problem(obj, where) or (where, "cannot be encoded as JSON")
    raise SafetylabError(f"{path}: {problem}")


def _string_keys(obj: Any, text: str) -> bool:
    """Whether every dict inside ``obj`` (whose JSON is ``text``) has string keys only, the one rule ``json``
    does not check. Without a ``{`` in ``text`` after its first character there is no nested dict (lists hold
    no keys), so only a top-level dict's keys need checking, in C, by joining them (a TypeError for a
    non-string one); anything else is walked."""
    if text.find("{", 1) < 0:
        if isinstance(obj, dict):
            "".join(obj)
        return True
    return _walk_keys(obj)


def _walk_keys(obj: Any) -> bool:
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, str) or (isinstance(value, (dict, list, tuple)) and not _walk_keys(value)):
                return False
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            if isinstance(value, (dict, list, tuple)) and not _walk_keys(value):
                return False
    return True


def _first_problem(obj: Any, path: str, depth: int = 0) -> tuple[str, str] | None:
    """The path and the problem of the first value in ``obj`` that is not JSON (depth first), None if all are."""
    if depth > MAX_DEPTH:
        shown = path if len(path) <= 80 else f"{path[:60]}...{path[-16:]}"
        return shown, f"nested more than {MAX_DEPTH} levels deep (or it contains itself)"
    if obj is None or isinstance(obj, (bool, int)):
        return None
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (path, f"expected a finite number, got {obj!r} (NaN and infinity "
                                                       "are not JSON)")
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError as e:
            return path, f"expected text encodable as UTF-8, got a lone surrogate at character {e.start}"
        return None
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, str):
                return path, f"expected string keys, got the {type(key).__name__} key {_short(key)}"
            found = _first_problem(value, f"{path}.{key}", depth + 1)
            if found:
                return found
        return None
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            found = _first_problem(value, f"{path}[{i}]", depth + 1)
            if found:
                return found
        return None
    return path, (f"expected a JSON value (object, array, string, number, true, false or null), got "
                  f"{type(obj).__name__} {_short(obj)}")


def _short(obj: Any) -> str:
    text = repr(obj)
    return text if len(text) <= 60 else text[:57] + "..."


def chain_hash(prev: str, body: bytes) -> str:
    """``h_n = SHA-256(bytes.fromhex(h_{n-1}) || body_n)`` as 64 hex digits; ``prev`` is ``h_{n-1}`` in hex
    (:data:`ZERO_HASH` before record 1). Each record commits to the whole chain before it, so changing,
    removing or moving one record changes every hash after it (a hash chain, as in Haber and Stornetta 1991,
    "How to time-stamp a digital document"; Schneier and Kelsey 1999, "Secure audit logs")."""
    return hashlib.sha256(bytes.fromhex(prev) + body).hexdigest()


def utc_time() -> str:
    """The current time as ISO 8601 UTC to the microsecond, always :data:`TIME_LENGTH` characters."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def record_body(seq: int, time: str, kind: str, data: Any) -> bytes:
    """A record's body: ``canonical({"seq": seq, "time": time, "kind": kind, "data": data})`` (the writer
    assembles the same bytes from ``data``'s encoding, made when it was appended)."""
    return canonical({"seq": seq, "time": time, "kind": kind, "data": data}, "record")


class AuditRecord(NamedTuple):
    """One committed record: its ``seq``, chain ``hash`` and body fields, the previous record's hash and the
    stored ``body`` bytes (``chain_hash(prev, body) == hash``). ``data`` of a record from
    :meth:`AuditLog.records` is parsed from the body; that of the record an :meth:`AuditLog.append`
    future resolves with is the object that was appended (the body was encoded from it then)."""

    seq: int
    hash: str
    time: str
    kind: str
    data: Any
    prev: str
    body: bytes


def parse_record(seq: int, prev: str, hash: str, body: bytes) -> AuditRecord:
    """The :class:`AuditRecord` of a stored row, parsed from its body."""
    try:
        fields = json.loads(body)
        return AuditRecord(seq, hash, fields["time"], fields["kind"], fields["data"], prev, body)
    except (ValueError, TypeError, KeyError) as e:
        raise SafetylabError(f"record {seq}: its body is not an audit record ({type(e).__name__}: {e}); "
                             "verify the log to find what was changed") from None


# ----------------------------------------------------------------------------- verification
@dataclass(frozen=True)
class Verification:
    """What :func:`verify_chain` found: ``ok``; ``checked``, the records found good (all of them when ok);
    ``first_bad``, the seq of the first bad or missing record (None when ok); ``problem`` in words; and
    ``head``, the ``(seq, hash)`` of the last good record (``(0, ZERO_HASH)`` when there is none)."""

    ok: bool
    checked: int
    first_bad: int | None
    problem: str | None
    head: tuple[int, str]

    def __str__(self) -> str:
        if self.ok:
            return f"ok: {self.checked} records, head {self.head[0]} {self.head[1]}"
        return f"record {self.first_bad}: {self.problem} ({self.checked} records before it are good)"


def check_head(expected_head: Any) -> tuple[int, str]:
    """``expected_head`` as ``(seq, hash)``, or a :class:`SafetylabError` saying what a head looks like."""
    try:
        seq, digest = expected_head
        ok = isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0 and isinstance(digest, str) \
            and re.fullmatch(r"[0-9a-f]{64}", digest) is not None
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise SafetylabError(f"expected_head: expected (seq, hash) with seq an int >= 0 and hash 64 lowercase "
                             f"hex digits (from AuditLog.head()), got {_short(expected_head)}")
    return seq, digest


def verify_chain(rows: Iterable[tuple[int, str, str, bytes]],
                 expected_head: tuple[int, str] | None = None) -> Verification:
    """Check stored rows ``(seq, prev, hash, body)``, in ``seq`` order, against the chain
    ``h_n = SHA-256(h_{n-1} || body_n)``, ``h_0`` = 64 zeros, and stop at the first bad record:

    - a ``seq`` that skips: the records in between were removed;
    - ``prev`` that is not the previous row's ``hash``: a record before it was removed or the records were
      reordered;
    - ``hash`` that does not match ``h_{n-1}`` and the body: the record was altered;
    - a body whose own ``seq`` (read from its canonical tail, ``,"seq":N,"time":"…"}``) is not the row's:
      the records were renumbered.

    With ``expected_head = (n, h)`` (a :meth:`AuditLog.head` kept elsewhere) the chain must also reach record
    n with hash h: a log cut short, or rewritten and re-hashed up to n, fails. Bodies are hashed as stored,
    never parsed or re-encoded, which keeps this loop at about a microsecond a record.
    """
    target = check_head(expected_head) if expected_head is not None else (-1, "")
    target_seq, sha256, end = target[0], hashlib.sha256, -_AFTER_TIME_MARK - len(_TIME_MARK)
    expect, last_hex, last_digest = 1, ZERO_HASH, bytes(32)
    ceiling, start, colon = 10, end - 1, end - 2  # seqs below ceiling: digits at body[start:end], ":" before
    for seq, prev, stored, body in rows:
        if seq >= ceiling:
            digits = len(str(seq))
            ceiling, start, colon = 10 ** digits, end - digits, end - digits - 1
        try:  # one test on the common path, without building a string per record; _problem says what is wrong
            digest = sha256(last_digest + body).digest()
            hex_digest = digest.hex()
            good = seq == expect and prev == last_hex and hex_digest == stored and seq != target_seq \
                and body[colon] == 58 and int(body[start:end]) == seq  # the body's own ..."seq":N,"time":"…"}
        except (TypeError, ValueError, IndexError):
            good = False
        if not good:
            found = _problem(expect, last_hex, last_digest, (seq, prev, stored, body), target)
            if found is not None:
                return Verification(False, expect - 1, found[0], found[1], (expect - 1, last_hex))
            digest = sha256(last_digest + body).digest()  # the expected head's record, found good
            hex_digest = digest.hex()
        last_hex, last_digest, expect = hex_digest, digest, seq + 1
    last_seq = expect - 1
    if target_seq > last_seq:
        return Verification(False, last_seq, expect, f"the log ends at record {last_seq} but the expected head is "
                            f"record {target_seq}: records {expect}-{target_seq} were removed (truncated)",
                            (last_seq, last_hex))
    return Verification(True, last_seq, None, None, (last_seq, last_hex))


def _problem(expect: int, last_hex: str, last_digest: bytes, row: tuple,
             target: tuple[int, str]) -> tuple[int, str] | None:
    """The first bad seq and what is wrong with the row read when record ``expect`` was due after a record
    with hash ``last_hex``, or None if nothing is."""
    seq, prev, stored, body = row
    if seq != expect:
        missing = f"record {expect} is" if seq == expect + 1 else f"records {expect}-{seq - 1} are"
        return expect, f"{missing} missing (the next stored record is {seq}): removed"
    if prev != last_hex:
        return seq, (f"its prev ({_short(prev)}) is not the hash of record {seq - 1} ({last_hex}): a record before "
                     "it was removed or the records were reordered")
    if not isinstance(body, bytes):
        return seq, f"its body is {type(body).__name__}, not bytes: the record was altered"
    hex_digest = hashlib.sha256(last_digest + body).hexdigest()
    if hex_digest != stored:
        return seq, "its hash does not match its body and the previous hash: the record was altered"
    marker = b',"seq":%d,"time":"' % seq
    if body[-_AFTER_TIME_MARK - len(marker):-_AFTER_TIME_MARK] != marker:
        return seq, _seq_problem(seq, body)
    if seq == target[0] and hex_digest != target[1]:
        return seq, (f"its hash {hex_digest} differs from the expected head's {target[1]}: the log was rewritten "
                     f"and re-hashed at or before record {seq}")
    return None


def _seq_problem(seq: int, body: bytes) -> str:
    try:
        fields = json.loads(body)
        own = fields["seq"]
    except (ValueError, TypeError, KeyError):
        return "its body is not an audit record (hash-valid, so the chain itself was rewritten)"
    if own != seq:
        return f"its body says seq {own!r}: the records were renumbered or reordered"
    return "its body is not in canonical form (hash-valid, so the chain itself was rewritten)"


# ----------------------------------------------------------------------------- the log
class AuditLog(ABC):
    """An append-only, hash-chained audit log with group commit (see the module's docstring).

    ``append(kind, data)`` returns a future of the committed :class:`AuditRecord`; ``flush()`` waits for
    everything appended so far; ``close()`` flushes and stops the writer (also on leaving a ``with`` block);
    ``records()``, ``head()``, ``len()`` and ``verify()`` read what is committed. Appends are thread-safe.
    ``batch`` is the most records one transaction commits; ``max_pending`` the number of waiting records at
    which an append commits them itself (:data:`HELPER_BATCH` or ``batch``, the smaller, by default: a caller
    appending in a tight loop then commits every 48 records, and the records in flight — each holds a future,
    about a dozen objects for Python's garbage collector — stay under the collector's threshold of 700 new
    objects, so appending triggers no collection; with a torch-sized heap one full collection would take
    tenths of a second).

    ``writer=False`` starts no writer thread: records are committed only by :meth:`flush` and by an append
    that finds ``max_pending`` waiting — for a caller that commits on its own schedule, such as a server
    committing each event-loop iteration's records on the loop itself.

    Commits are serialised by one lock: the writer thread takes it for each batch, and so do an
    :meth:`append` that finds ``max_pending`` records waiting (back-pressure without a hand-over: a caller
    appending in a tight loop commits its own batches, and the writer keeps out of its way) and
    :meth:`flush` (which commits what is pending in the caller's thread). Futures are resolved, and their
    callbacks run, after the lock is released, in the thread that committed. Backends implement
    :meth:`_commit`, :meth:`_fetch`, :meth:`_scan`, :meth:`_head`, :meth:`_count` and :meth:`_close`.
    """

    def __init__(self, where: str, batch: int = 100, max_pending: int | None = None, writer: bool = True):
        max_pending = min(batch, HELPER_BATCH) if max_pending is None else max_pending
        for name, value in (("batch", batch), ("max_pending", max_pending)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SafetylabError(f"{name}: expected an int >= 1, got {value!r}")
        self.where, self.batch, self.max_pending, self.background = where, batch, max_pending, bool(writer)
        self._lock = threading.Lock()  # guards the queue and the counters below
        self._work = threading.Condition(self._lock)  # the writer waits on it for records or close
        self._progress = threading.Condition(self._lock)  # flush waits on it for commits
        self._helped = -math.inf  # time.monotonic() when an append last committed a batch itself
        self._sleeping = False  # the writer waits until an append wakes it
        self._commit_lock = threading.Lock()  # held by whoever commits a batch
        self._pending: list[tuple] = []
        self._appended = self._done = self._failed = 0
        self._first_failure: BaseException | None = None
        self._closing = self._closed = False
        self._broken: str | None = None
        self._writer: threading.Thread | None = None
        self._pid = os.getpid()  # a forked child has the log's objects but neither its writer nor its connections
        self._kinds: dict[str, bytes] = {}  # kind -> b',"kind":"…","seq":', for up to MAX_KINDS kinds

    def _open(self, create: bool) -> None:
        """Connect the reading connection and set the store up (:meth:`_setup`), closing it again on failure."""
        self._conn = self._connect()
        try:
            self._setup(create)
        except BaseException:
            self._conn.close()
            raise

    # -- backend primitives
    @abstractmethod
    def _commit(self, items: list[tuple], stamp: str) -> list[tuple[int, str, str, bytes]]:
        """In one transaction holding the log's write lock: read the head, chain ``items`` after it
        (:meth:`_link`), insert the rows, commit; return the rows. Called holding the commit lock, from
        the writer thread or an appending one."""

    @abstractmethod
    def _fetch(self, after: int, end: int | None, limit: int) -> list[tuple[int, str, str, bytes]]:
        """Up to ``limit`` stored rows ``(seq, prev, hash, body)`` with ``after < seq <= end``, by seq."""

    @abstractmethod
    def _scan(self) -> AbstractContextManager[Iterable[tuple[int, str, str, bytes]]]:
        """All stored rows ``(seq, prev, hash, body)`` by seq, streamed from one snapshot on a connection of
        its own (for :meth:`verify`: no lock held, no lists of rows built)."""

    @abstractmethod
    def _head(self) -> tuple[int, str] | None:
        """The stored row with the highest seq as ``(seq, hash)``, None when there is none."""

    @abstractmethod
    def _count(self) -> int:
        """How many rows are stored."""

    @abstractmethod
    def _close(self) -> None:
        """Close the connections (no commit is running)."""

    @staticmethod
    def _link(items: list[tuple], seq: int, prev: str, stamp: str) -> list[tuple[int, str, str, bytes]]:
        """Rows ``(seq, prev, hash, body)`` chaining ``items`` after record ``seq`` whose hash is ``prev``:
        each body is its precomputed part + seq + ``,"time":"…"}`` (canonical: keys data, kind, seq, time)."""
        tail = _TIME_MARK + stamp.encode("ascii") + b'"}'
        sha256, digest = hashlib.sha256, bytes.fromhex(prev)
        rows = []
        for item in items:
            seq += 1
            body = b"%b%d%b" % (item[0], seq, tail)
            digest = sha256(digest + body).digest()
            hex_digest = digest.hex()
            rows.append((seq, prev, hex_digest, body))
            prev = hex_digest
        return rows

    # -- writing
    def append(self, kind: str, data: Any = None) -> Future:
        """Queue a record and return a future that resolves with the committed :class:`AuditRecord` once its
        batch is committed (or fails with a :class:`SafetylabError` if that batch could not be). ``data`` must
        be JSON (:func:`canonical`; a bad value is refused here, naming its field). When ``max_pending``
        records are waiting, commits a batch in this thread before returning."""
        kind_part = self._kinds.get(kind) if type(kind) is str else None
        if kind_part is None:
            kind_part = self._kind_part(kind)
        part = b'{"data":%b%b' % (canonical(data), kind_part)
        future: Future = Future()
        with self._lock:
            if self._closing:
                raise SafetylabError(f"{self.where}: the audit log is closed (no more appends)")
            if self._broken is not None:
                raise SafetylabError(f"{self.where}: the audit log's writer stopped ({self._broken}); reopen the log")
            if self._pid != os.getpid():
                raise SafetylabError(f"{self.where}: the audit log was opened in process {self._pid} and this process "
                                     "is a fork of it; open the log again in this process")
            self._pending.append((part, kind, data, future))  # part: the body up to its seq
            self._appended += 1
            waiting = len(self._pending)
            if self._writer is None and self.background:
                self._writer = threading.Thread(target=self._run, name=f"audit log writer {self.where}", daemon=True)
                self._writer.start()
            elif self._sleeping:
                self._sleeping = False
                self._work.notify()
        if waiting >= self.max_pending:
            self._step(helping=True)
        return future

    def _kind_part(self, kind: Any) -> bytes:
        if not isinstance(kind, str) or not kind:
            raise SafetylabError(f"{self.where}: kind: expected a non-empty string, got {_short(kind)}")
        part = b',"kind":%b,"seq":' % canonical(kind, "kind")
        if len(self._kinds) < MAX_KINDS:
            self._kinds[kind] = part
        return part

    def flush(self) -> None:
        """Commit what is pending (in this thread) and wait until every record appended before this call is
        committed. Raises a :class:`SafetylabError` if any record appended since the last flush failed to
        commit."""
        with self._lock:
            target = self._appended
        while self._done < target and self._pending and self._step():
            pass
        with self._progress:
            while self._done < target and self._broken is None:
                self._progress.wait()
            failed, first, self._failed, self._first_failure = self._failed, self._first_failure, 0, None
            broken, done = self._broken, self._done
        if done < target:
            raise SafetylabError(f"{self.where}: the audit log's writer stopped ({broken}); {target - done} "
                                 "records were not committed")
        if failed:
            raise SafetylabError(f"{self.where}: {failed} records appended since the last flush were not "
                                 f"committed: {first}")

    def _step(self, helping: bool = False) -> bool:
        """Commit the next batch of pending records (up to ``batch``) and resolve their futures; False when
        nothing was pending. ``helping``: called by an append that found ``max_pending`` records waiting."""
        with self._commit_lock:
            with self._lock:
                items = self._pending[:self.batch]
                del self._pending[:self.batch]
                if helping:
                    self._helped = time.monotonic()
            if not items:
                return False
            stamp = utc_time()
            try:
                outcome: list | SafetylabError = self._commit(items, stamp)
            except Exception as e:  # every future of the batch learns it, and so does the next flush
                outcome = SafetylabError(f"{self.where}: a batch of {len(items)} records was not committed "
                                         f"({type(e).__name__}: {e})")
                outcome.__cause__ = e
            with self._lock:
                self._done += len(items)
                if isinstance(outcome, SafetylabError):
                    self._failed += len(items)
                    self._first_failure = self._first_failure or outcome
                self._progress.notify_all()
        if isinstance(outcome, SafetylabError):
            for item in items:
                try:
                    item[3].set_exception(outcome)
                except InvalidStateError:  # cancelled by its caller
                    pass
            return True
        for (_, kind, data, future), (seq, prev, hex_digest, body) in zip(items, outcome):
            try:
                future.set_result(AuditRecord(seq, hex_digest, stamp, kind, data, prev, body))
            except InvalidStateError:
                pass
        return True

    def _run(self) -> None:
        """The writer thread: whenever records are pending, commit a batch — except within
        :data:`HELPER_GRACE` seconds of an append committing one itself: that caller is appending a burst
        and commits again at ``max_pending`` (or in :meth:`flush`), and taking turns with it would cost a
        thread switch per batch (on a busy machine, a wait for a free core each time). Meanwhile appends do
        not wake the writer (it wakes when the grace ends); they wake it only when it sleeps for want of
        records."""
        try:
            while True:
                with self._work:
                    while True:
                        delay = self._helped + HELPER_GRACE - time.monotonic()
                        if self._pending and (delay <= 0 or self._closing):
                            break
                        if self._closing:
                            return
                        if delay > 0:
                            self._work.wait(delay)
                        else:
                            self._sleeping = True
                            self._work.wait()
                            self._sleeping = False
                time.sleep(0)  # let running appenders add to the batch first
                self._step()
        except BaseException as e:  # a bug or an interpreter shutdown: never leave callers waiting silently
            with self._lock:
                self._broken = f"{type(e).__name__}: {e}"
                error = SafetylabError(f"{self.where}: the audit log's writer stopped ({self._broken})")
                for item in self._pending:
                    item[3].set_exception(error)
                self._pending.clear()
                self._work.notify_all()
                self._progress.notify_all()
            raise

    def close(self) -> None:
        """Commit what is pending, stop the writer and close the connections (idempotent). Raises like
        :meth:`flush` if records failed to commit."""
        if threading.current_thread() is self._writer:
            raise SafetylabError(f"{self.where}: close() called from a future's callback in the writer thread")
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._work.notify_all()
            writer = self._writer
        try:
            if writer is not None:
                writer.join()
            self.flush()
        finally:
            with self._commit_lock:
                self._closed = True
                self._close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading
    def _check_open(self) -> None:
        if self._closed:
            raise SafetylabError(f"{self.where}: the audit log is closed")

    def rows(self, start: int = 1, end: int | None = None) -> Iterator[tuple[int, str, str, bytes]]:
        """The stored rows ``(seq, prev, hash, body)`` with ``start <= seq <= end`` (to the last when end is
        None), by seq, read :data:`FETCH_ROWS` at a time (flattened in C: no Python frame per row)."""
        self._check_open()
        return itertools.chain.from_iterable(self._chunks(start, end))

    def _chunks(self, start: int, end: int | None) -> Iterator[list[tuple[int, str, str, bytes]]]:
        after = start - 1
        while True:
            chunk = self._fetch(after, end, FETCH_ROWS)
            yield chunk
            if len(chunk) < FETCH_ROWS:
                return
            after = chunk[-1][0]

    def records(self, start: int = 1, end: int | None = None) -> Iterator[AuditRecord]:
        """The committed records with ``start <= seq <= end`` (``end`` included; None: to the last), by seq,
        parsed from their bodies."""
        for row in self.rows(start, end):
            yield parse_record(*row)

    def head(self) -> tuple[int, str]:
        """``(seq, hash)`` of the last committed record, ``(0, ZERO_HASH)`` for an empty log: keep it elsewhere
        and pass it to :meth:`verify` later to detect a cut-off tail."""
        self._check_open()
        return self._head() or (0, ZERO_HASH)

    def count(self) -> int:
        """How many records are stored."""
        self._check_open()
        return self._count()

    def __len__(self) -> int:
        return self.count()

    def verify(self, expected_head: tuple[int, str] | None = None) -> Verification:
        """Re-hash the stored chain and report the first altered, removed or reordered record
        (:func:`verify_chain`); ``expected_head`` (an earlier :meth:`head`) also catches a cut-off tail."""
        if expected_head is not None:
            check_head(expected_head)
        self._check_open()
        with self._scan() as rows:
            return verify_chain(rows, expected_head)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.where!r}, batch={self.batch})"


# ----------------------------------------------------------------------------- SQLite
class SQLiteAuditLog(AuditLog):
    """The audit log in one SQLite file (table ``audit_log``), WAL mode.

    Durability: a future resolves after ``COMMIT`` returns. In WAL mode a commit appends the transaction's
    pages to the ``-wal`` file with ``write()`` before it returns; ``synchronous=NORMAL`` (the default here)
    only skips the ``fsync``, so a committed record survives the process being killed (``kill -9``: the
    written pages are in the operating system's cache and the next open replays them) and the file is never
    corrupted, but the last transactions may roll back after a power loss or an operating-system crash.
    SQLite's documentation of ``PRAGMA synchronous`` states both halves for WAL mode with NORMAL: always
    consistent, committed transactions durable across application crashes whatever the setting, the last
    ones possibly rolled back by a power loss or system crash
    (https://www.sqlite.org/pragma.html#pragma_synchronous); the kill -9 test checks the first. Pass
    ``synchronous="FULL"`` to ``fsync`` every commit and survive those too, at the cost of one fsync a batch.

    Several processes may append to one file on one machine (not over a network file system, where
    SQLite's locks do not hold): each batch runs in ``BEGIN IMMEDIATE``, waiting up to ``busy_timeout``
    seconds for another writer, and reads the head inside it. The file is marked as an audit log
    (``PRAGMA application_id``); ``create=False`` refuses to make a new one (for reading or verifying).
    """

    def __init__(self, path: str | Path, batch: int = 100, *, max_pending: int | None = None,
                 synchronous: str = "NORMAL", busy_timeout: float = 30.0, create: bool = True, writer: bool = True):
        self.path = Path(path)
        super().__init__(str(self.path), batch, max_pending, writer)
        if synchronous not in ("NORMAL", "FULL"):
            raise SafetylabError(f"synchronous: expected 'NORMAL' or 'FULL', got {synchronous!r}")
        self.synchronous, self.busy_timeout = synchronous, float(busy_timeout)
        self._read_lock = threading.Lock()
        self._wconn: sqlite3.Connection | None = None  # the committers' (one at a time: the commit lock)
        self._inserts: dict[int, str] = {}
        if self.path.is_dir():
            raise SafetylabError(f"{self.path}: is a directory (expected an audit-log file)")
        if not self.path.exists():
            if not create:
                raise SafetylabError(f"{self.path}: no such file (expected an audit-log file)")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open(create)

    def _insert(self, n: int) -> str:
        """``INSERT … VALUES (?, ?, ?, ?), …`` for ``n`` rows (cached per n)."""
        sql = self._inserts.get(n)
        if sql is None:
            sql = self._inserts[n] = ("INSERT INTO audit_log (seq, prev, hash, body) VALUES "
                                      + ", ".join(["(?, ?, ?, ?)"] * n))
        return sql

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False,
                                   cached_statements=2 * INSERT_ROWS + 16)
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
        except sqlite3.Error as e:
            raise SafetylabError(f"{self.path}: cannot open it as an SQLite audit log ({e})") from None
        return conn

    def _setup(self, create: bool) -> None:
        conn = self._conn
        try:
            if not self._is_audit_log():
                if not create:
                    raise SafetylabError(f"{self.path}: not an audit log (an empty database)")
                conn.execute("BEGIN IMMEDIATE")
                try:
                    if not self._is_audit_log():  # another process may have made it meanwhile
                        conn.execute("CREATE TABLE audit_log (seq INTEGER PRIMARY KEY, prev TEXT NOT NULL, "
                                     "hash TEXT NOT NULL, body BLOB NOT NULL)")
                        conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
                        conn.execute(f"PRAGMA user_version={FORMAT_VERSION}")
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.Error as e:
            raise SafetylabError(f"{self.path}: cannot open it as an SQLite audit log ({e})") from None
        if mode.lower() != "wal":
            raise SafetylabError(f"{self.path}: SQLite refused WAL mode (journal mode {mode!r}); the audit log needs "
                                 "it (a local file system, not a network share)")

    def _is_audit_log(self) -> bool:
        """True for a file made by this class, False for an empty database; a :class:`SafetylabError` for
        any other database (not an audit log, or a newer format)."""
        conn = self._conn
        app = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        if app == 0 and not tables:
            return False
        if app != APPLICATION_ID:
            listed = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
            raise SafetylabError(f"{self.path}: an SQLite database but not an audit log (application_id {app}, "
                                 f"tables: {listed or 'none'})")
        if version > FORMAT_VERSION:
            raise SafetylabError(f"{self.path}: audit-log format {version}, newer than this safetylab reads "
                                 f"({FORMAT_VERSION}); upgrade safetylab")
        columns = [r[1] for r in conn.execute("PRAGMA table_info(audit_log)")]
        if columns != ["seq", "prev", "hash", "body"]:
            raise SafetylabError(f"{self.path}: damaged audit log: table audit_log has columns {columns} (expected "
                                 "seq, prev, hash, body)")
        return True

    def _commit(self, items, stamp):
        conn = self._wconn
        if conn is None:
            conn = self._wconn = self._connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            head = conn.execute("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
            rows = self._link(items, *(head or (0, ZERO_HASH)), stamp)
            for start in range(0, len(rows), INSERT_ROWS):  # one statement per 100 rows: one step, one GIL release
                chunk = rows[start:start + INSERT_ROWS]
                conn.execute(self._insert(len(chunk)), [value for row in chunk for value in row])
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return rows

    def _read(self, sql: str, params: tuple = ()) -> list:
        with self._read_lock:
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as e:
                raise SafetylabError(f"{self.path}: cannot read the audit log ({e})") from None

    def _fetch(self, after, end, limit):
        if end is None:
            return self._read("SELECT seq, prev, hash, body FROM audit_log WHERE seq > ? ORDER BY seq LIMIT ?",
                              (after, limit))
        return self._read("SELECT seq, prev, hash, body FROM audit_log WHERE seq > ? AND seq <= ? ORDER BY seq "
                          "LIMIT ?", (after, end, limit))

    @contextmanager
    def _scan(self):
        conn = self._connect()
        try:
            yield conn.execute("SELECT seq, prev, hash, body FROM audit_log ORDER BY seq")
        except sqlite3.Error as e:
            raise SafetylabError(f"{self.path}: cannot read the audit log ({e})") from None
        finally:
            conn.close()

    def _head(self):
        rows = self._read("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
        return tuple(rows[0]) if rows else None

    def _count(self):
        return self._read("SELECT count(*) FROM audit_log")[0][0]

    def _close(self):
        with self._read_lock:
            self._conn.close()
        if self._wconn is not None:
            self._wconn.close()


# ----------------------------------------------------------------------------- PostgreSQL
def redact_dsn(dsn: str) -> str:
    """``dsn`` without its password, for messages (``host=… port=… dbname=… user=…``)."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        params = conninfo_to_dict(dsn)
    except Exception:  # noqa: BLE001 - any parse failure: say so without echoing the string
        return "<an unparsable DSN>"
    return " ".join(f"{k}={v}" for k, v in params.items() if k not in ("password", "passfile") and v is not None)


def check_table(table: str) -> tuple[str, ...]:
    """``table`` or ``schema.table`` split into identifiers (letters, digits and ``_``, not starting with a
    digit, at most 63 characters each), or a :class:`SafetylabError`: nothing else reaches the SQL."""
    parts = tuple(table.split(".")) if isinstance(table, str) else ()
    if not 1 <= len(parts) <= 2 or not all(_IDENTIFIER.fullmatch(p) for p in parts):
        raise SafetylabError(f"table: expected a name like audit_log or schema.audit_log (letters, digits and _, not "
                             f"starting with a digit, at most 63 characters each), got {_short(table)}")
    return parts


class PostgresAuditLog(AuditLog):
    """The audit log in a PostgreSQL table (``table``, or ``schema.table``; created when missing), for
    several server processes on several machines. Each batch is one transaction that takes
    ``LOCK TABLE … IN EXCLUSIVE MODE`` (one writer at a time, readers not blocked) and reads the head
    inside it. A future resolves after ``COMMIT`` returns, which with PostgreSQL's default
    ``synchronous_commit = on`` means the batch is flushed to the server's write-ahead log. A connection
    lost between batches is opened again for the next one. Needs ``psycopg`` (``pip install
    'safetylab[postgres]'``).

    ``max_pending`` is ``10 × batch`` by default: a commit here waits on the network and the server's disk
    with the interpreter lock released, so the writer thread's commits overlap the appenders' work, and an
    append commits a batch itself only as back-pressure.
    """

    COLUMNS = {"seq": "bigint", "prev": "text", "hash": "text", "body": "bytea"}

    def __init__(self, dsn: str, table: str = "audit_log", batch: int = 100, *, max_pending: int | None = None,
                 connect_timeout: int = 10, create: bool = True, writer: bool = True):
        parts = check_table(table)
        try:
            import psycopg
            from psycopg import sql
        except ImportError:
            raise SafetylabError("a PostgreSQL audit log needs psycopg: pip install 'safetylab[postgres]'") from None
        self.dsn, self.table, self.connect_timeout = dsn, table, connect_timeout
        if max_pending is None and isinstance(batch, int):
            max_pending = 10 * batch
        super().__init__(f"PostgreSQL {redact_dsn(dsn)}, table {table}", batch, max_pending, writer)
        self._psycopg = psycopg
        ident = sql.Identifier(*parts)
        self._sql = {
            "lock": sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(ident),
            "head": sql.SQL("SELECT seq, hash FROM {} ORDER BY seq DESC LIMIT 1").format(ident),
            "copy": sql.SQL("COPY {} (seq, prev, hash, body) FROM STDIN").format(ident),
            "fetch": sql.SQL("SELECT seq, prev, hash, body FROM {} WHERE seq > %s ORDER BY seq LIMIT %s").format(ident),
            "fetch_to": sql.SQL("SELECT seq, prev, hash, body FROM {} WHERE seq > %s AND seq <= %s ORDER BY seq "
                                "LIMIT %s").format(ident),
            "count": sql.SQL("SELECT count(*) FROM {}").format(ident),
            "scan": sql.SQL("SELECT seq, prev, hash, body FROM {} ORDER BY seq").format(ident),
            "create": sql.SQL("CREATE TABLE IF NOT EXISTS {} (seq bigint PRIMARY KEY, prev text NOT NULL, "
                              "hash text NOT NULL, body bytea NOT NULL)").format(ident),
        }
        self._ident = ident
        self._read_lock = threading.Lock()
        self._wconn = None
        self._open(create)

    def _connect(self):
        psycopg = self._psycopg
        try:
            from psycopg.conninfo import conninfo_to_dict

            extra = {} if "connect_timeout" in conninfo_to_dict(self.dsn) else {"connect_timeout": self.connect_timeout}
            return psycopg.connect(self.dsn, autocommit=True, **extra)
        except psycopg.Error as e:
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SafetylabError(f"{self.where}: cannot connect to PostgreSQL ({message}); expected a DSN such as "
                                 "'host=127.0.0.1 port=5432 dbname=NAME user=USER' or postgresql://USER@HOST/NAME") \
                from None

    def _setup(self, create: bool) -> None:
        psycopg = self._psycopg
        conn = self._conn
        try:
            name = self._ident.as_string(conn)
            if conn.execute("SELECT to_regclass(%s)", (name,)).fetchone()[0] is None:
                if not create:
                    raise SafetylabError(f"{self.where}: no such table (expected an audit-log table)")
                with conn.transaction():  # one creator at a time: CREATE TABLE IF NOT EXISTS races otherwise
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (APPLICATION_ID,))
                    conn.execute(self._sql["create"])
            columns = dict(conn.execute(
                "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = "
                "to_regclass(%s) AND attnum > 0 AND NOT attisdropped ORDER BY attnum", (name,)).fetchall())
        except psycopg.Error as e:
            raise SafetylabError(f"{self.where}: cannot open the audit-log table ({e})") from None
        if columns != self.COLUMNS:
            raise SafetylabError(f"{self.where}: not an audit-log table (columns {columns}, expected {self.COLUMNS})")

    def _commit(self, items, stamp):
        conn = self._wconn
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                conn.close()
            conn = self._wconn = self._connect()
        with conn.transaction():
            conn.execute(self._sql["lock"])
            head = conn.execute(self._sql["head"]).fetchone()
            rows = self._link(items, *(head or (0, ZERO_HASH)), stamp)
            with conn.cursor() as cursor, cursor.copy(self._sql["copy"]) as copy:
                for row in rows:
                    copy.write_row(row)
        return rows

    def _read(self, query, params: tuple = ()) -> list:
        psycopg = self._psycopg
        with self._read_lock:
            try:
                if self._conn.closed or self._conn.broken:
                    self._conn = self._connect()
                return self._conn.execute(query, params).fetchall()
            except psycopg.Error as e:
                raise SafetylabError(f"{self.where}: cannot read the audit log ({e})") from None

    def _fetch(self, after, end, limit):
        if end is None:
            return self._read(self._sql["fetch"], (after, limit))
        return self._read(self._sql["fetch_to"], (after, end, limit))

    @contextmanager
    def _scan(self):
        psycopg = self._psycopg
        conn = self._connect()
        try:
            with conn.transaction(), conn.cursor(name="audit_log_scan") as cursor:
                cursor.itersize = FETCH_ROWS
                cursor.execute(self._sql["scan"])
                yield cursor
        except psycopg.Error as e:
            raise SafetylabError(f"{self.where}: cannot read the audit log ({e})") from None
        finally:
            conn.close()

    def _head(self):
        rows = self._read(self._sql["head"])
        return tuple(rows[0]) if rows else None

    def _count(self):
        return self._read(self._sql["count"])[0][0]

    def _close(self):
        with self._read_lock:
            self._conn.close()
        if self._wconn is not None:
            self._wconn.close()


def is_dsn(target: str | Path) -> bool:
    """Whether ``target`` names a PostgreSQL database (``postgresql://…``, ``postgres://…`` or libpq
    ``key=value`` pairs starting with a connection keyword such as ``host=``) rather than a file."""
    return isinstance(target, str) and (target.startswith(("postgresql://", "postgres://"))
                                        or _DSN_KEYS.match(target) is not None)


def open_audit_log(target: str | Path, *, table: str = "audit_log", batch: int = 100, create: bool = True,
                   **options: Any) -> AuditLog:
    """The audit log at ``target``: a PostgreSQL DSN (:func:`is_dsn`) opens :class:`PostgresAuditLog` on
    ``table``, anything else is a file path for :class:`SQLiteAuditLog`. ``options`` go to the class."""
    if is_dsn(target):
        return PostgresAuditLog(str(target), table, batch, create=create, **options)
    if table != "audit_log":
        raise SafetylabError(f"table: an SQLite audit log always uses the table audit_log, got {table!r}")
    return SQLiteAuditLog(target, batch, create=create, **options)
