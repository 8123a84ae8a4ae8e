import os
import socket
import threading
import time
import uuid

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Two xdist workers share two cores: one intra-op thread each. More threads oversubscribe the
    cores, and OpenMP's spinning then makes tiny models many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def world():
    from safetylab.world import World

    return World()


@pytest.fixture(scope="session")
def tok(world):
    """A world tokenizer trained on a small corpus (fast to build, covers the vocabulary); some test
    modules define their own."""
    from safetylab.models import train_tokenizer

    return train_tokenizer(world.corpus(300, fact_repeats=1))


@pytest.fixture(scope="session")
def tiny_lm(tok):
    """``tiny_lm("gpt2" | "llama")``: a one-layer causal LM for ``tok`` with fixed weights and no
    dropout, built with transformers from a config (two calls give identical models)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    def build(name: str):
        torch.manual_seed(0)
        ids = {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
        if name == "gpt2":
            return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=1, n_head=2, n_embd=32, n_positions=128,
                                              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids))
        return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=128, **ids))

    return build


@pytest.fixture(scope="session")
def digits():
    """The built-in digits splits (classes 0–7 known, 8 and 9 held out), seed 0."""
    from safetylab.models.digits import load_digits

    return load_digits(seed=0)


@pytest.fixture(scope="session")
def digits_model(digits):
    """A digits CNN trained normally for 10 epochs (~2 s; test accuracy about 0.98), in eval mode.
    Session-wide: tests must not train or modify it (copy.deepcopy it first)."""
    from safetylab.models.classifier import ClassifierTrainConfig, digits_cnn
    from safetylab.robust.training import train_classifier

    torch.manual_seed(0)
    model = digits_cnn(digits.num_classes)
    train_classifier(model, (digits.x_train, digits.y_train), ClassifierTrainConfig(epochs=10))
    return model.eval()


@pytest.fixture
def postgres_dsn():
    """A DSN for a fresh, empty schema (first on its ``search_path``) on a PostgreSQL server, dropped with
    everything in it afterwards. The server: ``SAFETYLAB_TEST_POSTGRES`` (a DSN), by default
    ``host=127.0.0.1 port=5432 dbname=test user=postgres``. Where none is reachable the test is skipped with
    the reason, unless ``SAFETYLAB_REQUIRE_POSTGRES=1`` (as in CI), which makes it fail instead."""
    base = os.environ.get("SAFETYLAB_TEST_POSTGRES") or "host=127.0.0.1 port=5432 dbname=test user=postgres"
    try:
        import psycopg
        from psycopg.conninfo import conninfo_to_dict, make_conninfo
    except ImportError as e:
        _no_postgres(f"psycopg is not installed ({e})")
    try:
        params = conninfo_to_dict(base)
    except psycopg.Error as e:
        _no_postgres(f"SAFETYLAB_TEST_POSTGRES is not a valid DSN ({e})")
    shown = " ".join(f"{k}={v}" for k, v in params.items() if k != "password")
    try:
        admin = psycopg.connect(base, autocommit=True, connect_timeout=5)
    except psycopg.Error as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        _no_postgres(f"no PostgreSQL server reachable at {shown!r} ({reason})")
    schema = f"safetylab_test_{uuid.uuid4().hex[:16]}"
    with admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
        options = f"{params.get('options') or ''} -c search_path={schema}".strip()
        try:
            yield make_conninfo(base, options=options)
        finally:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


def _no_postgres(reason: str) -> None:
    if os.environ.get("SAFETYLAB_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"{reason}, and SAFETYLAB_REQUIRE_POSTGRES=1 requires one")
    pytest.skip(f"{reason}; set SAFETYLAB_TEST_POSTGRES to a DSN to run the PostgreSQL tests")


@pytest.fixture
def serve():
    """``serve(app) -> port``: an ASGI app run by uvicorn in a thread on a free loopback port, until the test
    ends."""
    import uvicorn

    running = []

    def start(app) -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        running.append((server, thread))
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return port

    yield start
    for server, thread in running:
        server.should_exit = True
        thread.join(10)
