"""The audit log: canonical encoding, the hash chain, group commit, tamper detection on SQLite and
PostgreSQL, several processes on one log, committed records surviving kill -9, and clear errors."""

import hashlib
import json
import multiprocessing
import os
import signal
import sqlite3
import threading
import time
from contextlib import closing
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safetylab.control.auditlog import (
    ZERO_HASH,
    PostgresAuditLog,
    SQLiteAuditLog,
    Verification,
    canonical,
    chain_hash,
    is_dsn,
    open_audit_log,
    record_body,
    verify_chain,
)
from safetylab.core.errors import SafetylabError

needs_fork = pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(),
                                reason="the multi-process tests fork (no fork on this platform)")


class Backend:
    """A log's target (a file or a DSN) and raw SQL on its table, for tampering behind the log's back."""

    def __init__(self, name, target):
        self.name, self.target = name, target

    def open(self, **options):
        return open_audit_log(self.target, **options)

    def sql(self, statement, params=()):
        if self.name == "sqlite":
            with closing(sqlite3.connect(self.target, isolation_level=None)) as conn:
                return conn.execute(statement, params).fetchall()
        import psycopg

        with psycopg.connect(self.target, autocommit=True) as conn:
            cursor = conn.execute(statement.replace("?", "%s"), params)
            return cursor.fetchall() if cursor.description else []


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request, tmp_path):
    if request.param == "sqlite":
        return Backend("sqlite", str(tmp_path / "audit.db"))
    return Backend("postgres", request.getfixturevalue("postgres_dsn"))


def filled(backend, n=10, batch=3):
    """A log of ``n`` records (``{"i": 0…}``), committed in batches of ``batch``: the records and the head."""
    with backend.open(batch=batch) as log:
        futures = [log.append("event", {"i": i, "text": f"record {i}"}) for i in range(n)]
        log.flush()
        head = log.head()
    return [f.result() for f in futures], head


# ----------------------------------------------------------------------------- encoding and hashing
def test_canonical_encoding_is_sorted_compact_utf8():
    assert canonical({"b": 1, "a": [1, "é", None, True, 0.5]}) == '{"a":[1,"é",null,true,0.5],"b":1}'.encode()
    assert canonical({"a": 1, "b": 2}) == canonical({"b": 2, "a": 1})
    assert canonical((1, 2)) == canonical([1, 2]) == b"[1,2]"
    assert canonical("x") == b'"x"' and canonical(None) == b"null"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=60, deadline=None)
@given(json_values)
def test_canonical_is_a_fixed_point_whatever_the_key_order(value):
    encoded = canonical(value)
    assert canonical(json.loads(encoded)) == encoded
    if isinstance(value, dict):
        assert canonical(dict(reversed(list(value.items())))) == encoded


@pytest.mark.parametrize("value, where, expected", [
    ({"scores": [1.0, float("nan")]}, r"data\.scores\[1\]", "expected a finite number, got nan"),
    ({"a": {"b": float("-inf")}}, r"data\.a\.b", "expected a finite number, got -inf"),
    ({"tags": {"x", "y"}}, r"data\.tags", "expected a JSON value .*got set"),
    ({"raw": b"bytes"}, r"data\.raw", "expected a JSON value .*got bytes"),
    ({"when": datetime(2025, 1, 1)}, r"data\.when", "expected a JSON value .*got datetime"),
    ({"ids": {1: "one"}}, r"data\.ids", "expected string keys, got the int key 1"),
    ({True: "one"}, "data", "expected string keys, got the bool key True"),
    ({"rows": [1, {"ok": 1, 2.5: "x"}]}, r"data\.rows\[1\]", "expected string keys, got the float key 2.5"),
    ({"ok": 1, "text": "\ud800"}, r"data\.text", "expected text encodable as UTF-8, got a lone surrogate"),
])
def test_canonical_refuses_what_is_not_json_naming_the_field(value, where, expected):
    with pytest.raises(SafetylabError, match=f"^{where}: {expected}"):
        canonical(value)


def test_canonical_refuses_a_value_that_contains_itself():
    loop = []
    loop.append(loop)
    with pytest.raises(SafetylabError, match="nested more than 500 levels deep"):
        canonical({"loop": loop})


def test_chain_hash_by_hand():
    assert hashlib.sha256(bytes(32)).hexdigest() == "66687aadf862bd776c8fc18b8e9f8e20089714856ee233b3902a591d0d5f2925"
    assert chain_hash(ZERO_HASH, b"") == "66687aadf862bd776c8fc18b8e9f8e20089714856ee233b3902a591d0d5f2925"
    first = chain_hash(ZERO_HASH, b'{"x":1}')
    assert first == hashlib.sha256(b"\0" * 32 + b'{"x":1}').hexdigest()
    assert chain_hash(first, b'{"x":2}') == hashlib.sha256(bytes.fromhex(first) + b'{"x":2}').hexdigest()


def rows_by_hand(n):
    rows, prev = [], ZERO_HASH
    for seq in range(1, n + 1):
        body = record_body(seq, "2025-01-31T12:00:00.000000Z", "event", {"i": seq})
        rows.append((seq, prev, chain_hash(prev, body), body))
        prev = rows[-1][2]
    return rows


def rehashed(rows, start):
    """``rows`` with the chain recomputed from index ``start`` on (what a forger with write access does)."""
    rows = list(rows)
    for i in range(start, len(rows)):
        prev = rows[i - 1][2] if i else ZERO_HASH
        rows[i] = (rows[i][0], prev, chain_hash(prev, rows[i][3]), rows[i][3])
    return rows


@pytest.mark.parametrize("seq", [9, 10, 99, 100, 101])
def test_a_body_whose_seq_is_not_its_rows_is_found_across_digit_counts(seq):
    rows = rows_by_hand(120)
    assert verify_chain(rows).ok
    forged = list(rows)
    forged[seq - 1] = (seq, None, None, record_body(seq + 10, "2025-01-31T12:00:00.000000Z", "event", {"i": seq}))
    result = verify_chain(rehashed(forged, seq - 1))
    assert (result.ok, result.first_bad) == (False, seq) and f"its body says seq {seq + 10}" in result.problem


def test_verify_chain_on_rows_in_memory():
    rows = rows_by_hand(4)
    assert verify_chain(rows) == Verification(True, 4, None, None, (4, rows[-1][2]))
    assert verify_chain([]) == Verification(True, 0, None, None, (0, ZERO_HASH))
    assert verify_chain(rows, expected_head=(2, rows[1][2])).ok
    text_body = rows[:2] + [(3, rows[2][1], rows[2][2], rows[2][3].decode())] + rows[3:]
    result = verify_chain(text_body)
    assert (result.first_bad, result.checked, result.head) == (3, 2, (2, rows[1][2])) and "not bytes" in result.problem
    assert "record 3:" in str(result) and str(verify_chain(rows)).startswith("ok: 4 records")
    for head in [(1, "abc"), ("1", rows[0][2]), (-1, ZERO_HASH), 5, None.__class__]:
        with pytest.raises(SafetylabError, match="expected_head: expected \\(seq, hash\\)"):
            verify_chain(rows, expected_head=head)


# ----------------------------------------------------------------------------- appending and reading
def test_append_flush_and_read_back(backend):
    data = [{"prompt": "héllo ✓", "scores": [0.5, 1, None], "nested": {"b": True, "a": "x"}}, None, "just text",
            [1, 2], 3.25]
    with backend.open(batch=2) as log:
        assert log.head() == (0, ZERO_HASH) and len(log) == 0 and log.verify().ok
        futures = [log.append(f"kind{i % 2}", value) for i, value in enumerate(data)]
        log.flush()
        committed = [f.result(timeout=10) for f in futures]
        assert [r.seq for r in committed] == [1, 2, 3, 4, 5]
        assert list(log.records()) == committed
        for prev, record in zip([ZERO_HASH] + [r.hash for r in committed], committed):
            assert record.prev == prev and chain_hash(prev, record.body) == record.hash
            assert record.body == record_body(record.seq, record.time, record.kind, record.data)
            assert datetime.strptime(record.time, "%Y-%m-%dT%H:%M:%S.%fZ")
        assert [r.seq for r in log.records(2, 4)] == [2, 3, 4] and [r.seq for r in log.records(4)] == [4, 5]
        assert log.head() == (5, committed[-1].hash) and len(log) == log.count() == 5
        assert log.verify() == Verification(True, 5, None, None, (5, committed[-1].hash))
    with backend.open() as again:  # reopened, the chain goes on from the stored head
        sixth = again.append("later", {}).result(timeout=10)
        assert (sixth.seq, sixth.prev) == (6, committed[-1].hash) and again.verify().ok


def test_concurrent_appends_get_consecutive_seqs(backend):
    results = {}
    with backend.open(batch=16) as log:
        def worker(t):
            futures = [log.append("event", {"thread": t, "i": i}) for i in range(100)]
            results[t] = [f.result(timeout=30) for f in futures]

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(r.seq for rs in results.values() for r in rs) == list(range(1, 801))
        assert all([r.seq for r in rs] == sorted(r.seq for r in rs) for rs in results.values())
        stored = {(r.data["thread"], r.data["i"]): r.seq for r in log.records()}
        assert stored == {(r.data["thread"], r.data["i"]): r.seq for rs in results.values() for r in rs}
        assert log.verify().ok


def test_a_lone_record_is_committed_without_waiting_for_a_batch(tmp_path):
    with SQLiteAuditLog(tmp_path / "a.db", batch=100) as log:
        assert log.append("one", {"x": 1}).result(timeout=10).seq == 1 and len(log) == 1


def hold_write_lock(path):
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    return blocker


def test_a_burst_is_committed_in_batches(tmp_path):
    path, sizes = tmp_path / "a.db", []
    with SQLiteAuditLog(path, batch=100, max_pending=10_000) as log:
        commit = log._commit

        def counting(items, stamp):
            sizes.append(len(items))
            return commit(items, stamp)

        log._commit = counting
        blocker = hold_write_lock(path)
        log.append("event", {"i": 0})
        while not sizes:  # the writer has the first record and waits for the lock
            time.sleep(0.001)
        futures = [log.append("event", {"i": i}) for i in range(1, 251)]
        blocker.execute("COMMIT")
        blocker.close()
        log.flush()
        assert [f.result().seq for f in futures] == list(range(2, 252))
    assert sizes == [1, 100, 100, 50]


def test_a_failed_commit_fails_its_batch_and_the_log_carries_on(tmp_path):
    path = tmp_path / "a.db"
    with SQLiteAuditLog(path, busy_timeout=0.05) as log:
        assert log.append("before", {}).result(timeout=10).seq == 1
        blocker = hold_write_lock(path)
        futures = [log.append("during", {"i": i}) for i in range(5)]
        for future in futures:
            with pytest.raises(SafetylabError, match="records was not committed .*locked"):
                future.result(timeout=10)
        with pytest.raises(SafetylabError, match="5 records appended since the last flush were not committed"):
            log.flush()
        blocker.execute("ROLLBACK")
        blocker.close()
        after = log.append("after", {}).result(timeout=10)
        log.flush()
        assert after.seq == 2 and [r.kind for r in log.records()] == ["before", "after"] and log.verify().ok


def test_a_cancelled_future_still_gets_its_record_written(tmp_path):
    path = tmp_path / "a.db"
    with SQLiteAuditLog(path) as log:
        blocker = hold_write_lock(path)
        log.append("first", {})
        cancelled = log.append("second", {})
        assert cancelled.cancel()
        blocker.execute("COMMIT")
        blocker.close()
        log.flush()
        assert [r.kind for r in log.records()] == ["first", "second"]


def test_a_closed_log_says_so(tmp_path):
    log = SQLiteAuditLog(tmp_path / "a.db")
    log.append("x", {}).result(timeout=10)
    log.close()
    log.close()
    for call in (lambda: log.append("x", {}), lambda: list(log.records()), log.head, log.verify, lambda: len(log)):
        with pytest.raises(SafetylabError, match="closed"):
            call()


# ----------------------------------------------------------------------------- tampering
def alter_body(backend, records):
    backend.sql("UPDATE audit_log SET body = ? WHERE seq = 5", (records[4].body.replace(b'"i":4', b'"i":9'),))


def delete_row(backend, records):
    backend.sql("DELETE FROM audit_log WHERE seq = 5")


def swap_rows(backend, records):
    for old, new in ((4, -1), (5, 4), (-1, 5)):
        backend.sql("UPDATE audit_log SET seq = ? WHERE seq = ?", (new, old))


def alter_prev(backend, records):
    backend.sql("UPDATE audit_log SET prev = ? WHERE seq = 5", ("f" * 64,))


def renumber_and_rehash(backend, records):
    """Remove record 5, move 6… down one and re-hash them: only the bodies' own seqs tell."""
    backend.sql("DELETE FROM audit_log WHERE seq = 5")
    prev = records[3].hash
    for record in records[5:]:
        digest = chain_hash(prev, record.body)
        backend.sql("UPDATE audit_log SET seq = ?, prev = ?, hash = ? WHERE seq = ?", (record.seq - 1, prev, digest,
                                                                                       record.seq))
        prev = digest


@pytest.mark.parametrize("tamper, first_bad, word", [
    (alter_body, 5, "altered"),
    (delete_row, 5, "record 5 is missing"),
    (swap_rows, 4, "reordered"),
    (alter_prev, 5, "its prev"),
    (renumber_and_rehash, 5, "renumbered"),
], ids=lambda x: getattr(x, "__name__", None))
def test_verify_pinpoints_the_first_bad_record(backend, tamper, first_bad, word):
    records, head = filled(backend)
    tamper(backend, records)
    with backend.open(create=False) as log:
        result = log.verify()
        assert log.verify(expected_head=head) == result
    assert not result.ok and result.first_bad == first_bad and word in result.problem
    assert result.checked == first_bad - 1 and result.head == (first_bad - 1, records[first_bad - 2].hash)


def test_a_cut_tail_shows_only_against_the_expected_head(backend):
    records, head = filled(backend)
    backend.sql("DELETE FROM audit_log WHERE seq > 7")
    with backend.open(create=False) as log:
        alone, kept = log.verify(), log.verify(expected_head=head)
    assert alone.ok and alone.head == (7, records[6].hash)
    assert not kept.ok and kept.first_bad == 8 and "records 8-10 were removed (truncated)" in kept.problem


def test_a_rehashed_chain_fails_against_the_expected_head(backend):
    records, head = filled(backend)
    prev = records[3].hash
    for record in records[4:]:
        body = record.body.replace(b'"i":4', b'"i":9')
        digest = chain_hash(prev, body)
        backend.sql("UPDATE audit_log SET prev = ?, hash = ?, body = ? WHERE seq = ?", (prev, digest, body, record.seq))
        prev = digest
    with backend.open(create=False) as log:
        assert log.verify().ok
        result = log.verify(expected_head=head)
        assert log.verify(expected_head=(4, records[3].hash)).ok  # a head kept before the rewrite still holds
    assert not result.ok and result.first_bad == 10 and "rewritten and re-hashed" in result.problem


# ----------------------------------------------------------------------------- several processes, kill -9
def append_in_child(target, proc, n):
    with open_audit_log(target, batch=7) as log:
        for i in range(n):
            log.append("event", {"proc": proc, "i": i})


@needs_fork
def test_two_processes_append_to_one_chain(backend):
    context = multiprocessing.get_context("fork")
    children = [context.Process(target=append_in_child, args=(backend.target, proc, 300)) for proc in range(2)]
    for child in children:  # both start on a log that does not exist yet
        child.start()
    for child in children:
        child.join(60)
    assert [child.exitcode for child in children] == [0, 0]
    with backend.open(create=False) as log:
        assert log.verify().ok
        records = list(log.records())
    assert [r.seq for r in records] == list(range(1, 601))
    for proc in range(2):
        assert [r.data["i"] for r in records if r.data["proc"] == proc] == list(range(300))


def burst_until_killed(target, fd):
    def answer(future):  # runs once the record is committed: the "response" of a request
        record = future.result()
        os.write(fd, b"%d %d\n" % (record.seq, record.data["i"]))

    with open_audit_log(target, batch=50) as log:
        for i in range(10**9):
            log.append("request", {"i": i, "pad": "x" * 100}).add_done_callback(answer)


@needs_fork
def test_every_answered_record_survives_kill_9(backend):
    read, write = os.pipe()
    child = multiprocessing.get_context("fork").Process(target=burst_until_killed, args=(backend.target, write))
    child.start()
    os.close(write)
    answered, buffer, deadline = {}, b"", time.monotonic() + 30
    with os.fdopen(read, "rb") as pipe:
        while len(answered) < 1000 and time.monotonic() < deadline:
            chunk = pipe.read1(1 << 16)
            if not chunk:
                break
            *lines, buffer = (buffer + chunk).split(b"\n")
            answered.update(tuple(map(int, line.split())) for line in lines)
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
    assert child.exitcode == -signal.SIGKILL and len(answered) >= 1000
    with backend.open(create=False) as log:
        result = log.verify()
        stored = {r.seq: r.data["i"] for r in log.records()}
    assert result.ok and len(stored) >= len(answered)
    assert {seq: stored.get(seq) for seq in answered} == answered


# ----------------------------------------------------------------------------- bad input
def test_data_that_is_not_json_is_refused_at_append(tmp_path):
    with SQLiteAuditLog(tmp_path / "a.db") as log:
        with pytest.raises(SafetylabError, match=r"data\.scores\[1\]: expected a finite number"):
            log.append("x", {"scores": [1.0, float("nan")]})
        for kind in ("", 3, None):
            with pytest.raises(SafetylabError, match="kind: expected a non-empty string"):
                log.append(kind, {})
        assert len(log) == 0 and log.append("ok", {}).result(timeout=10).seq == 1


def test_files_that_are_not_audit_logs(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello\n" * 100)
    with pytest.raises(SafetylabError, match="notes.txt: cannot open it as an SQLite audit log .*not a database"):
        SQLiteAuditLog(text)
    assert text.read_text() == "hello\n" * 100
    other = tmp_path / "other.db"
    with closing(sqlite3.connect(other)) as conn:
        conn.execute("CREATE TABLE users (name TEXT)")
    with pytest.raises(SafetylabError, match="other.db: an SQLite database but not an audit log .*tables: users"):
        SQLiteAuditLog(other)
    with pytest.raises(SafetylabError, match="is a directory"):
        SQLiteAuditLog(tmp_path)
    with pytest.raises(SafetylabError, match="missing.db: no such file"):
        SQLiteAuditLog(tmp_path / "missing.db", create=False)
    with pytest.raises(SafetylabError, match="batch: expected an int >= 1, got 0"):
        SQLiteAuditLog(tmp_path / "b.db", batch=0)
    with pytest.raises(SafetylabError, match="synchronous: expected 'NORMAL' or 'FULL'"):
        SQLiteAuditLog(tmp_path / "b.db", synchronous="OFF")
    assert not (tmp_path / "missing.db").exists() and not (tmp_path / "b.db").exists()
    newer = tmp_path / "newer.db"
    SQLiteAuditLog(newer).close()
    with closing(sqlite3.connect(newer)) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(SafetylabError, match="audit-log format 99, newer than this safetylab reads"):
        SQLiteAuditLog(newer)


def test_a_wrong_dsn_or_table_name_is_refused():
    with pytest.raises(SafetylabError, match="cannot connect to PostgreSQL") as caught:
        PostgresAuditLog("host=127.0.0.1 port=1 dbname=test user=postgres password=hunter2 connect_timeout=2")
    assert "hunter2" not in str(caught.value)
    for table in ('audit_log"; DROP TABLE users; --', "1st", "a.b.c", "", "x" * 64):
        with pytest.raises(SafetylabError, match="table: expected a name like audit_log"):
            PostgresAuditLog("host=127.0.0.1 port=1", table=table)
    with pytest.raises(SafetylabError, match="an SQLite audit log always uses the table audit_log"):
        open_audit_log("a.db", table="other")


def test_postgres_tables_that_are_not_audit_logs(postgres_dsn):
    with pytest.raises(SafetylabError, match="no such table"):
        PostgresAuditLog(postgres_dsn, table="missing", create=False)
    Backend("postgres", postgres_dsn).sql("CREATE TABLE users (name text)")
    with pytest.raises(SafetylabError, match="not an audit-log table"):
        PostgresAuditLog(postgres_dsn, table="users")


def test_open_audit_log_picks_the_backend(tmp_path, postgres_dsn):
    assert is_dsn("postgresql://user@host/db") and is_dsn("postgres://host") and is_dsn(" host=127.0.0.1 port=5432")
    assert not is_dsn("audit.db") and not is_dsn("logs/host=1.db") and not is_dsn(Path("host=x"))
    with open_audit_log(tmp_path / "a.db") as log:
        assert isinstance(log, SQLiteAuditLog)
    with open_audit_log(postgres_dsn, table="events") as log:
        assert isinstance(log, PostgresAuditLog) and log.append("x", {}).result(timeout=10).seq == 1


def append_in_forked_child(log):
    try:
        log.append("x", {})
    except SafetylabError as e:
        os._exit(3 if "fork of it" in str(e) else 4)
    os._exit(0)


@needs_fork
def test_a_forked_child_cannot_use_its_parents_log(tmp_path):
    with SQLiteAuditLog(tmp_path / "a.db") as log:
        log.append("x", {}).result(timeout=10)
        child = multiprocessing.get_context("fork").Process(target=append_in_forked_child, args=(log,))
        child.start()
        child.join(30)
        assert child.exitcode == 3 and len(log) == 1
