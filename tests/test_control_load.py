"""A bounded load test on loopback: 16 concurrent clients send 480 requests to a real server process (a guard of
rules and a classifier around the echo model); every request gets a 200, and every one has its audit record
in a chain that verifies — none lost, none doubled. Latency percentiles are printed, not asserted (timing targets
belong to benchmarks/)."""

import asyncio
import json
import statistics
import time

import httpx
from test_control_cli import free_port, guard_dir, start_server  # noqa: F401  (guard_dir is a fixture)

from safetylab.control.auditlog import SQLiteAuditLog
from safetylab.control.state import State

CLIENTS, REQUESTS = 16, 480


async def burst(url: str, key: str) -> list[tuple[int, str | None, float]]:
    queue = asyncio.Queue()
    for i in range(REQUESTS):
        queue.put_nowait(i)
    results = []

    async def client():
        async with httpx.AsyncClient(timeout=30, headers={"Authorization": f"Bearer {key}"}) as http:
            while not queue.empty():
                i = queue.get_nowait()
                start = time.perf_counter()
                r = await http.post(f"{url}/v1/chat/completions",
                                    json={"model": "safetylab-world",
                                          "messages": [{"role": "user", "content": f"what is {i} plus {i} ?"}]})
                results.append((r.status_code, r.json().get("id"), time.perf_counter() - start))

    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return results


def test_concurrent_clients_lose_no_record_and_get_no_error(guard_dir, tmp_path):  # noqa: F811
    key = State(tmp_path / "state.db").add_key("load", "user", rate_per_minute=1e9)
    State(tmp_path / "state.db").add_key("admin", "admin")
    port = free_port()
    server = start_server(guard_dir, tmp_path, port)
    try:
        start = time.perf_counter()
        results = asyncio.run(burst(f"http://127.0.0.1:{port}", key))
        seconds = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(20)
    assert [status for status, _, _ in results] == [200] * REQUESTS
    latencies = sorted(t for *_, t in results)
    print(json.dumps({"requests": REQUESTS, "clients": CLIENTS, "per_second": round(REQUESTS / seconds, 1),
                      "p50_ms": round(1000 * statistics.median(latencies), 2),
                      "p99_ms": round(1000 * latencies[int(0.99 * len(latencies)) - 1], 2)}))
    with SQLiteAuditLog(tmp_path / "audit.db", create=False) as log:
        assert log.verify().ok
        logged = [r.data["request"] for r in log.records() if r.kind == "exchange"]
    assert sorted(logged) == sorted(request for _, request, _ in results)
