"""The control commands end to end: build a guard, add keys, serve it in a real process, kill that process
with SIGKILL during a burst of requests and find every answered request in a log that still verifies,
catch a tampered log, and retrain a guard classifier from reviews."""

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from test_cli import run_main

from safetylab.control.auditlog import SQLiteAuditLog
from safetylab.control.config import load_guard
from safetylab.control.state import State


@pytest.fixture(scope="module")
def guard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("guard")
    result = subprocess.run([sys.executable, "-m", "safetylab", "control", "build-guard", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "guard calibration" in result.stdout
    return out


def test_build_guard_writes_a_calibrated_guard_that_loads(guard_dir):
    guard = load_guard(guard_dir / "guard.yaml")
    assert [layer.name for layer in guard.input_layers] == ["rules", "input-classifier"]
    assert [layer.name for layer in guard.output_layers] == ["secrets", "output-classifier"]
    assert guard.check_input("how do i hurt my neighbour ?").decision == "block"
    assert guard.check_input("what is 12 plus 30 ?").decision == "allow"
    text = (guard_dir / "guard.yaml").read_text()
    assert "calibration:" in text and "fpr_block: 0.01" in text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(guard_dir: Path, tmp_path: Path, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "safetylab", "serve", "--echo", "--guard", str(guard_dir / "guard.yaml"),
               "--state", str(tmp_path / "state.db"), "--log", str(tmp_path / "audit.db"), "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited: {process.stderr.read()}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1)
            return process
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError("the server did not start within 60 s")


def test_a_server_killed_mid_burst_keeps_every_answered_request_in_a_verifying_log(guard_dir, tmp_path):
    State(tmp_path / "state.db").add_key("bootstrap", "admin")  # no admin.key file this time
    key = State(tmp_path / "state.db").add_key("load", "user", rate_per_minute=100_000)
    port = free_port()
    server = start_server(guard_dir, tmp_path, port)
    answered = []

    def ask(i: int):
        try:
            r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=10,
                           headers={"Authorization": f"Bearer {key}"},
                           json={"model": "safetylab-world",
                                 "messages": [{"role": "user", "content": f"what is {i} plus 1 ?"}]})
        except httpx.TransportError:
            return None
        if r.status_code == 200:
            return r.json()["id"], r.json()["safetylab"]["audit_seq"]
        return None

    try:
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(ask, i) for i in range(400)]
            while sum(f.done() for f in futures) < 60:
                time.sleep(0.01)
            os.kill(server.pid, signal.SIGKILL)
            answered = [f.result() for f in futures if f.result() is not None]
    finally:
        server.kill()
        server.wait(10)
    assert 60 <= len(answered) < 400, "the kill should land mid-burst"
    with SQLiteAuditLog(tmp_path / "audit.db", create=False) as log:
        assert log.verify().ok
        logged = {r.data["request"]: r.seq for r in log.records() if r.kind == "exchange"}
    assert all(logged.get(request) == seq for request, seq in answered), "an answered request has no record"


def test_serve_creates_an_admin_key_on_first_start_and_the_kill_switch_works(guard_dir, tmp_path):
    port = free_port()
    server = start_server(guard_dir, tmp_path, port)
    try:
        admin = (tmp_path / "admin.key").read_text().strip()
        assert oct((tmp_path / "admin.key").stat().st_mode)[-3:] == "600"
        headers = {"Authorization": f"Bearer {admin}"}
        assert httpx.post(f"http://127.0.0.1:{port}/admin/halt", json={"reason": "drill"}, headers=headers).json()[
            "halted"]
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", headers=headers,
                       json={"model": "safetylab-world", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and "drill" in r.json()["error"]["message"]
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(20)


def test_verify_log_names_the_first_tampered_record(monkeypatch, capsys, tmp_path):
    path = tmp_path / "audit.db"
    with SQLiteAuditLog(path) as log:
        for i in range(20):
            log.append("exchange", {"i": i})
        log.flush()
        head = log.head()
    code, out, _ = run_main(monkeypatch, capsys, "control", "verify-log", str(path))
    assert code == 0 and out.startswith("ok: 20 records")
    with sqlite3.connect(path) as db:
        body = db.execute("SELECT body FROM audit_log WHERE seq = 7").fetchone()[0]
        db.execute("UPDATE audit_log SET body = ? WHERE seq = 7", (bytes(body).replace(b'"i":6', b'"i":9'),))
    code, out, _ = run_main(monkeypatch, capsys, "control", "verify-log", str(path))
    assert code == 1 and out.startswith("record 7:")
    with sqlite3.connect(path) as db:
        db.execute("UPDATE audit_log SET body = ? WHERE seq = 7", (body,))
        db.execute("DELETE FROM audit_log WHERE seq >= 19")
    code, out, _ = run_main(monkeypatch, capsys, "control", "verify-log", str(path))
    assert code == 0  # a cut-off tail looks whole without the head kept elsewhere …
    code, out, _ = run_main(monkeypatch, capsys, "control", "verify-log", str(path), "--head", f"{head[0]}:{head[1]}")
    assert code == 1 and out.startswith("record 19:")  # … and is caught with it


def test_reviews_are_exported_and_retrain_the_input_classifier(guard_dir, tmp_path, monkeypatch, capsys):
    import shutil

    guard = tmp_path / "guard"
    shutil.copytree(guard_dir, guard)
    state = State(tmp_path / "state.db")
    ids = [state.enqueue(p, "ok .", {"verdicts": []}, "alice")
           for p in ("how do i bake bread ?", "tell me the secret recipe for mischief")]
    state.decide(ids[0], "approve", "rita")
    state.decide(ids[1], "reject", "rita")
    code, out, _ = run_main(monkeypatch, capsys, "control", "export-reviews", "--out", str(tmp_path / "r.jsonl"),
                            "--state", str(tmp_path / "state.db"))
    assert code == 0 and "wrote 2 reviews" in out
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["label"]) for r in records] == [("how do i bake bread ?", 0),
                                                           ("tell me the secret recipe for mischief", 1)]
    probe = ["tell me the secret recipe for mischief"]
    before = load_guard(guard / "guard.yaml").input_layers[1].classifier.score(probe)
    code, out, err = run_main(monkeypatch, capsys, "control", "retrain", "--guard", str(guard / "guard.yaml"),
                              "--reviews", str(tmp_path / "r.jsonl"))
    assert code == 0, err
    assert "2 reviews added" in out
    after = load_guard(guard / "guard.yaml").input_layers[1].classifier.score(probe)
    assert after[0] > before[0]
    assert "reviews_added: 2" in (guard / "guard.yaml").read_text()
    code, _, err = run_main(monkeypatch, capsys, "control", "retrain", "--guard", str(guard / "guard.yaml"),
                            "--reviews", str(tmp_path / "r.jsonl"), "--layer", "nope")
    assert code == 2 and "no classifier layer named 'nope'" in err
