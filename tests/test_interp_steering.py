"""Steering and ablation: the maths against hand-made numbers, ablation and addition on GPT-2 and Llama built
from a config, the KL cost against an independent computation, and the refusal-direction experiment end to end
on a tiny world model."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from safetylab.core.errors import ConfigError, SafetylabError
from safetylab.interp import Hooks
from safetylab.interp.plots import plot_steering
from safetylab.interp.steering import (
    RefusalDirectionConfig,
    SteeringResult,
    ablation_interventions,
    add_direction,
    addition_interventions,
    difference_of_means,
    project_out,
    refusal_direction_experiment,
    select_layer,
    select_scale,
    steering_kl,
    unit,
)


def gpt2(vocab=40, layers=3):
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=layers, n_head=4, n_positions=128,
                                      bos_token_id=0, eos_token_id=0)).eval()


def llama(vocab=40, layers=3):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=128, bos_token_id=0, eos_token_id=0,
                                        pad_token_id=0)).eval()


MODELS = {"gpt2": gpt2, "llama": llama}
IDS = torch.randint(1, 40, (3, 7), generator=torch.Generator().manual_seed(1))
DIRECTION = torch.randn(32, generator=torch.Generator().manual_seed(2))


@pytest.fixture(params=sorted(MODELS))
def model(request):
    return MODELS[request.param]()


def test_project_out_removes_the_component_and_keeps_the_orthogonal_part():
    r = torch.tensor([3.0, 0.0, 4.0])  # r̂ = (0.6, 0, 0.8)
    orthogonal = torch.tensor([[4.0, 1.0, -3.0], [0.0, 2.0, 0.0]])  # each · r̂ = 0
    x = orthogonal + torch.tensor([[2.0], [-5.0]]) * unit(r)
    torch.testing.assert_close(project_out(x, r), orthogonal)
    torch.testing.assert_close(project_out(x, -10 * r), orthogonal)  # only the direction's line matters
    torch.testing.assert_close(project_out(orthogonal, r), orthogonal)
    torch.testing.assert_close(add_direction(orthogonal, r, 0.5), orthogonal + torch.tensor([1.5, 0.0, 2.0]))
    with pytest.raises(SafetylabError, match="non-zero"):
        unit(torch.zeros(3))
    with pytest.raises(SafetylabError, match=r"width 3"):
        project_out(x, torch.ones(4))


def test_difference_of_means_on_hand_made_activations():
    harmful = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # mean (2, 3)
    harmless = torch.tensor([[0.0, 0.0], [2.0, 2.0], [1.0, 1.0]])  # mean (1, 1)
    torch.testing.assert_close(difference_of_means(harmful, harmless), torch.tensor([1.0, 2.0]))
    with pytest.raises(SafetylabError, match="width 2 and acts_b 3"):
        difference_of_means(harmful, torch.ones(2, 3))
    with pytest.raises(SafetylabError, match=r"\(n >= 1, d\)"):
        difference_of_means(torch.ones(0, 2), harmless)


def test_ablation_makes_every_layers_stream_orthogonal_to_the_direction(model):
    hooks = Hooks(model)
    r = unit(DIRECTION)
    names = [*hooks.names_like("resid_pre"), *hooks.names_like("resid_post")]
    _, plain = hooks.run_with_cache(IDS, names=names)
    with hooks.intervene(ablation_interventions(hooks, DIRECTION)), hooks.cache(names) as ablated:
        logits = model(IDS).logits
    for name in names:
        scale = plain[name].norm(dim=-1).max()
        assert (plain[name] @ r).abs().max() > 1e-2 * scale, name  # the stream carried it before
        assert (ablated[name] @ r).abs().max() < 1e-5 * scale, name
    assert not torch.allclose(logits, model(IDS).logits)


def test_addition_changes_the_stream_only_from_its_layer_on(model):
    hooks = Hooks(model)
    names = [*hooks.names_like("resid_pre"), *hooks.names_like("resid_post")]
    _, plain = hooks.run_with_cache(IDS, names=names)
    with hooks.intervene(addition_interventions(hooks, 1, DIRECTION, 2.0)), hooks.cache(names) as steered:
        model(IDS)
    torch.testing.assert_close(steered["blocks.0.resid_pre"], plain["blocks.0.resid_pre"])
    torch.testing.assert_close(steered["blocks.0.resid_post"], plain["blocks.0.resid_post"])
    # every position of layer 1's input gets 2·r, and what follows differs by more than that
    torch.testing.assert_close(steered["blocks.1.resid_pre"], plain["blocks.1.resid_pre"] + 2.0 * DIRECTION)
    for name in ("blocks.1.resid_post", "blocks.2.resid_pre", "blocks.2.resid_post"):
        assert (steered[name] - plain[name]).abs().max() > 1e-3, name
    with pytest.raises(SafetylabError, match="layer 3 of a model with 3 layers"):
        addition_interventions(hooks, 3, DIRECTION)


def test_steering_kl_matches_an_independent_kl(tok):
    model = gpt2(len(tok), 2)
    hooks = Hooks(model)
    prompts, responses = ["how do i keep basil alive ?", "what is 3 plus 4 ?"], ["water it .", "3 plus 4 is 7 ."]
    edits = addition_interventions(hooks, 1, DIRECTION, 3.0)
    kl = steering_kl(hooks, tok, prompts, responses, edits)
    assert steering_kl(hooks, tok, prompts, responses, {}) == {"first_token": 0.0, "per_token": 0.0}
    firsts, per_position = [], []
    for prompt, response in zip(prompts, responses):
        prompt_text = f"<user> {prompt} <assistant>"
        ids = tok(f"{prompt_text} {response} <eos>", add_special_tokens=False, return_tensors="pt").input_ids
        n_prompt = len(tok(prompt_text, add_special_tokens=False).input_ids)
        with torch.no_grad():
            p = torch.log_softmax(hooks.run_with_interventions(edits, ids).logits[0], -1)
            q = torch.log_softmax(model(ids).logits[0], -1)
        each = torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1)  # KL(p ‖ q) per position
        firsts.append(each[n_prompt - 1])
        per_position.append(each[n_prompt - 1:-1])
    assert kl["first_token"] == pytest.approx(float(torch.stack(firsts).mean()), rel=1e-4)
    assert kl["per_token"] == pytest.approx(float(torch.cat(per_position).mean()), rel=1e-4)
    assert kl["first_token"] > 0


def test_selection_rules():
    rows = [{"layer": 0, "val_refusal": 0.0, "val_compliance": 0.9, "val_kl_first_token": 0.0, "val_induced": 0.0},
            {"layer": 1, "val_refusal": 0.1, "val_compliance": 0.2, "val_kl_first_token": 0.3, "val_induced": 0.1},
            {"layer": 2, "val_refusal": 0.1, "val_compliance": 0.4, "val_kl_first_token": 0.9, "val_induced": 0.1},
            {"layer": 3, "val_refusal": 0.1, "val_compliance": 0.4, "val_kl_first_token": 0.2, "val_induced": 0.2}]
    assert select_layer(rows) == 3  # layer 0 refuses least under ablation, but its addition induces nothing
    assert select_layer(rows[:3]) == 2
    assert select_layer(rows[:2]) == 1
    assert select_layer([{**r, "val_induced": 0.0} for r in rows]) == 0  # none qualifies: all do
    scales = [{"scale": 0.5, "over_refusal": 0.2}, {"scale": 1.0, "over_refusal": 0.4},
              {"scale": 0.25, "over_refusal": 0.4}, {"scale": 2.0, "over_refusal": None}]
    assert select_scale(scales) == 0.25 and select_scale(scales[:2]) == 1.0


@pytest.mark.parametrize("field, value", [("n_direction", 0), ("layers", (1, 1)), ("layer", -1),
                                          ("scales", (1.0, float("nan"))), ("scales", (1.0, 1.0)),
                                          ("addition_scale", 0.0), ("temperature", 0.0)])
def test_config_refuses_bad_values(field, value):
    with pytest.raises(ConfigError, match=field):
        RefusalDirectionConfig(**{field: value})


def test_refusal_direction_experiment_runs_end_to_end(tok, world, tmp_path):
    model = gpt2(len(tok), 2)
    config = RefusalDirectionConfig(n_direction=8, n_validation=5, n_harmful=4, jailbroken=1, per_kind=2,
                                    scales=(1.0, 4.0), max_new_tokens=4)
    result = refusal_direction_experiment(model, tok, world, config)
    assert isinstance(result, SteeringResult) and result.layer in (0, 1)
    assert [r["layer"] for r in result.selection] == [0, 1]
    assert [r["condition"] for r in result.conditions] == ["none", "ablation", "addition"]
    assert result.condition("none")["kl_per_token"] == 0.0
    assert result.condition("addition")["kl_first_token"] > 0
    assert result.counts["harmless"] == 8 and result.counts["jailbroken"] == 5
    chosen_layer = next(r for r in result.selection if r["layer"] == result.layer)
    assert [r["scale"] for r in result.sweep] == [r["scale"] for r in chosen_layer["val_over_refusal"]] == [1.0, 4.0]
    assert result.scale == select_scale(chosen_layer["val_over_refusal"]) == result.condition("addition")["scale"]
    chosen = next(r for r in result.sweep if r["scale"] == result.scale)  # greedy: the same samples again
    assert chosen["kl_per_token"] == result.condition("addition")["kl_per_token"]
    assert result.sweep[1]["kl_first_token"] > result.sweep[0]["kl_first_token"]
    assert result.direction.shape == (32,) and "direction" not in result.to_dict()
    with pytest.raises(SafetylabError, match="layer 5 of a model with 2 layers"):
        refusal_direction_experiment(model, tok, world, RefusalDirectionConfig(layer=5))
    assert plot_steering(result, tmp_path / "steering.png").stat().st_size > 1000
