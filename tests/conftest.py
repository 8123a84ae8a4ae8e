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
