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
