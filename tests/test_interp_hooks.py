"""Hook points on GPT-2 and Llama built from a config: names, caches, interventions, no leftover hooks."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from safetylab.core.errors import SafetylabError
from safetylab.interp import Hooks, check_signature, model_signature
from safetylab.interp.data import pad_right


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=4, n_positions=16,
                                      bos_token_id=0, eos_token_id=0)).eval()


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                        bos_token_id=0, eos_token_id=0, pad_token_id=0)).eval()


MODELS = {"gpt2": gpt2, "llama": llama}
IDS = torch.randint(1, 40, (3, 7), generator=torch.Generator().manual_seed(1))


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(params=sorted(MODELS))
def model(request):
    return MODELS[request.param]()


def test_names_are_flat_and_in_forward_order(model):
    hooks = Hooks(model)
    per_block = ["resid_pre", "attn.z", "attn.out", "resid_mid", "mlp.post", "mlp.out", "resid_post"]
    assert hooks.names == ("embed", *(f"blocks.{i}.{s}" for i in range(2) for s in per_block), "ln_final.out")
    assert hooks.names_like("resid_post") == ["blocks.0.resid_post", "blocks.1.resid_post"]


def test_cache_decomposes_the_residual_stream(model):
    hooks = Hooks(model)
    out, cache = hooks.run_with_cache(IDS)
    for i in range(2):
        pre, attn, mlp = (cache[f"blocks.{i}.{s}"] for s in ("resid_pre", "attn.out", "mlp.out"))
        torch.testing.assert_close(pre + attn, cache[f"blocks.{i}.resid_mid"])
        torch.testing.assert_close(pre + attn + mlp, cache[f"blocks.{i}.resid_post"])
    torch.testing.assert_close(cache["blocks.0.resid_post"], cache["blocks.1.resid_pre"])
    assert cache["blocks.0.attn.z"].shape == (3, 7, 4, 8)
    # the logit lens on the last layer's stream is the model's own output
    torch.testing.assert_close(hooks.unembed(cache["blocks.1.resid_post"]), out.logits)
    assert hook_count(model) == 0


def test_filtered_cache_and_early_stop(model):
    hooks = Hooks(model)
    out, cache = hooks.run_with_cache(IDS, where=lambda n: n.endswith("resid_post"))
    assert list(cache) == ["blocks.0.resid_post", "blocks.1.resid_post"]
    stopped, early = hooks.run_with_cache(IDS, names="blocks.0.resid_post", stop_early=True)
    assert stopped is None and list(early) == ["blocks.0.resid_post"]
    torch.testing.assert_close(early["blocks.0.resid_post"], cache["blocks.0.resid_post"])
    with pytest.raises(SafetylabError, match="nothing cached at 'embed'; cached: blocks.0.resid_post"):
        early["embed"]


def test_interventions_change_the_forward_pass_and_end_with_their_block(model):
    hooks = Hooks(model)
    clean = model(IDS).logits
    seen = []
    with hooks.intervene({"blocks.1.attn.z": lambda z: torch.zeros_like(z),
                          "blocks.0.mlp.out": lambda x: seen.append(x.shape)}):
        zeroed, cache = hooks.run_with_cache(IDS, names=["blocks.1.attn.out", "blocks.1.resid_pre"])
    assert seen == [(3, 7, 32)]
    projection = hooks.points["blocks.1.attn.z"].module  # zero heads: attention adds the projection's bias alone
    torch.testing.assert_close(cache["blocks.1.attn.out"], projection(torch.zeros(3, 7, 32)).detach())
    assert not torch.allclose(zeroed.logits, clean)
    torch.testing.assert_close(model(IDS).logits, clean)  # nothing left behind
    assert hook_count(model) == 0


def test_replacing_the_stream_reaches_the_output(model):
    hooks = Hooks(model)
    _, cache = hooks.run_with_cache(IDS[:1])
    patched = hooks.run_with_interventions({"blocks.1.resid_post": lambda x: cache["blocks.1.resid_post"].expand_as(x)},
                                           IDS[1:2])
    torch.testing.assert_close(patched.logits, model(IDS[:1]).logits)


def test_hooks_are_removed_on_error(model):
    hooks = Hooks(model)

    def boom(x):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), hooks.intervene({"blocks.0.resid_post": boom}):
        model(IDS)
    with pytest.raises(ValueError), hooks.cache():
        raise ValueError
    assert hook_count(model) == 0


def test_bad_input_is_a_clear_error(model):
    hooks = Hooks(model)
    with pytest.raises(SafetylabError, match=r"unknown hook point 'blocks.0.resid_psot'; did you mean "
                                             r"blocks.0.resid_post.*valid names: embed, blocks.\{0..1\}"):
        hooks.select("blocks.0.resid_psot")
    with pytest.raises(SafetylabError, match="no block has 'hook_resid_post'; expected one of"):
        hooks.names_like("hook_resid_post")
    with pytest.raises(SafetylabError, match="resid_mid: can be cached but not edited"):
        with hooks.intervene({"blocks.0.resid_mid": lambda x: x}):
            pass
    with pytest.raises(SafetylabError, match=r"blocks.0.resid_post: the intervention returned shape \(3, 7, 31\) for "
                                             r"an activation of shape \(3, 7, 32\)"):
        hooks.run_with_interventions({"blocks.0.resid_post": lambda x: x[..., :31]}, IDS)
    assert hook_count(model) == 0


def test_signature_refuses_another_model():
    signature = model_signature(gpt2())
    check_signature(signature, gpt2(), "a probe")
    with pytest.raises(SafetylabError, match="a probe was made for another model: model_type gpt2 .this model: llama"):
        check_signature(signature, llama(), "a probe")


def test_right_padding_keeps_last_token_activations():
    model = gpt2()
    hooks = Hooks(model)
    rows = [[5, 6, 7], [8, 9, 10, 11, 12]]
    batch = pad_right(rows, pad_id=0)
    assert batch.last.tolist() == [2, 4]
    _, cache = hooks.run_with_cache(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                    names="blocks.1.resid_post")
    _, alone = hooks.run_with_cache(torch.tensor([rows[0]]), names="blocks.1.resid_post")
    torch.testing.assert_close(cache["blocks.1.resid_post"][0, 2], alone["blocks.1.resid_post"][0, 2])
