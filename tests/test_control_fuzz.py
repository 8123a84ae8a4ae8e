"""The server's API fuzzed from its own OpenAPI spec (schemathesis strategies, hypothesis, in-process over
ASGI), with valid and with malformed requests: no route answers with a server error (the kill switch's 503
aside: that is the server working), every error is in OpenAI's shape, and no route answers without a valid key
of the right role."""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from safetylab.control.auditlog import SQLiteAuditLog
from safetylab.control.guard import Guard
from safetylab.control.layers import Rule, RulesLayer
from safetylab.control.server import Server, ServerConfig, create_app, echo_generator
from safetylab.control.state import State

FUZZ = settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz")
    guard = Guard([RulesLayer(rules=[Rule("ignore your rules", "escalate"), Rule("poison", "block")],
                              max_chars=2000)])
    server = Server(echo_generator, guard, SQLiteAuditLog(path / "audit.db"), State(path / "state.db"),
                    ServerConfig(max_body_bytes=16_384))
    keys = {role: server.state.add_key(role, role, rate_per_minute=1e9) for role in ("user", "reviewer", "admin")}
    app = create_app(server)
    operations = [result.ok() for result in schemathesis.openapi.from_asgi("/openapi.json", app).get_all_operations()]
    yield server, keys, operations
    server.log.close()


def is_server_error(response) -> bool:
    if response.status_code == 503 and response.json()["error"]["code"] == "halted":
        return False
    return response.status_code >= 500


def fuzz(operations, check, mode: GenerationMode) -> int:
    """Run ``check`` on cases of every operation; the number of operations fuzzed (an operation without
    parameters or body has no malformed form: negative mode skips it)."""
    fuzzed = 0
    for operation in operations:
        try:
            FUZZ(given(case=operation.as_strategy(mode))(lambda case: check(case)))()
            fuzzed += 1
        except Unsatisfiable:
            if mode is GenerationMode.POSITIVE:
                raise
    return fuzzed


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
def test_no_server_errors_and_errors_in_one_shape(served, mode):
    server, keys, operations = served

    def check(case):
        response = case.call(headers={"Authorization": f"Bearer {keys['admin']}"})
        assert not is_server_error(response), (case.method, case.path, response.text)
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "code"}
        if server.state.switch().halted:
            server.state.release("fuzz")

    assert fuzz(operations, check, mode) >= (10 if mode is GenerationMode.POSITIVE else 5)


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
def test_no_access_without_a_valid_key_or_with_a_lower_role(served, mode):
    server, keys, operations = served

    def check(case):
        for headers in ({}, {"Authorization": "Bearer sl-not-a-key"}, {"Authorization": "Basic c2w6eA=="},
                        {"Authorization": f"Bearer {keys['user']}x"}):
            response = case.call(headers=headers)
            # refused: for want of a key, or earlier, as malformed (a body too large, an unknown route)
            assert response.status_code in (400, 401, 404, 405, 413), (headers, case.path, response.status_code)
        for role in ("user", "reviewer"):
            response = case.call(headers={"Authorization": f"Bearer {keys[role]}"})
            assert not is_server_error(response)
            if case.path.startswith("/admin") or (role == "user" and case.path.startswith("/review")):
                assert response.status_code in (400, 403, 404, 405, 413), (role, case.path, response.status_code)

    assert fuzz(operations, check, mode) >= (10 if mode is GenerationMode.POSITIVE else 5)
