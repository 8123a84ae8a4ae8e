"""Sparse autoencoders: each loss and pseudo-gradient against hand-computed values, the decoder constraint,
AuxK's dead latents, the activation store, CE loss recovered at its two ends, metrics, checkpoints that
refuse the wrong model, the synthetic benchmark and the dashboard."""

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from safetylab.core.errors import ConfigError, SafetylabError
from safetylab.interp import Hooks, model_signature
from safetylab.interp.dashboard import feature_dashboard
from safetylab.interp.data import conversation_ids, pad_right
from safetylab.interp.sae import (
    STEPS,
    JumpReLUFunction,
    SAEConfig,
    SparseAutoencoder,
    StepFunction,
    TrainState,
    auxk_code,
    ce_loss_recovered,
    jumprelu_loss,
    load_sae,
    lr_factor,
    normalized_mse,
    relu_l1_loss,
    sae_metrics,
    sparsity_factor,
    topk_auxk_loss,
    topk_code,
    train_sae,
)
from safetylab.interp.store import ActivationStore, token_batches, train_on_model, world_batches, world_token_rows
from safetylab.interp.synthetic import SyntheticConfig, SyntheticFeatures, mean_best_cosine, run_benchmark

NAME = "blocks.0.resid_post"


def tiny_gpt2(vocab=40, layers=1, d=16, seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=d, n_layer=layers, n_head=2, n_positions=32,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)).eval()


def rows_of(lengths, vocab=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


def identity_sae(d):
    """A ReLU SAE that reconstructs exactly: f = (ReLU(x), ReLU(−x)), x̂ = f₊ − f₋."""
    sae = SparseAutoencoder(SAEConfig(kind="relu", d_in=d, d_sae=2 * d))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    return sae.eval()


# ----------------------------------------------------------------------------- losses, by hand
def test_relu_l1_loss_weights_the_penalty_by_decoder_norms():
    x, x_hat = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 2.0]])
    f, norms = torch.tensor([[1.0, 2.0]]), torch.tensor([2.0, 0.5])
    loss, sparsity = relu_l1_loss(x, x_hat, f, norms, l1_coefficient=0.5)
    assert sparsity.item() == pytest.approx(1 * 2 + 2 * 0.5)
    assert loss.item() == pytest.approx(1.0 + 0.5 * 3.0)


def test_topk_loss_is_normalised_mse_plus_auxk_on_the_residual():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # centred: Σ‖x − x̄‖² = 2
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 0.0]])  # error 1
    assert normalized_mse(x, x_hat).item() == pytest.approx(0.5)
    # residual e = [[0, −1], [0, 0]], Σ‖e − ē‖² = 0.5; ê = 0 leaves Σ‖e‖² = 1: nmse 2
    loss, aux = topk_auxk_loss(x, x_hat, torch.zeros(2, 2), aux_coefficient=1 / 32)
    assert aux.item() == pytest.approx(2.0)
    assert loss.item() == pytest.approx(0.5 + 2.0 / 32)
    loss, aux = topk_auxk_loss(x, x_hat, None, aux_coefficient=1 / 32)
    assert (loss.item(), aux.item()) == (pytest.approx(0.5), 0.0)


def test_jumprelu_loss_counts_latents_above_threshold():
    x, x_hat = torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    z = torch.tensor([[0.5, 0.05, 2.0]])
    loss, l0 = jumprelu_loss(x, x_hat, z, torch.full((3,), 0.1), l0_coefficient=0.3, bandwidth=0.01)
    assert l0.item() == 2
    assert loss.item() == pytest.approx(1.0 + 0.3 * 2)
    # the pre-activation term: λ_p Σ ReLU(θ − z) ‖W_d,i‖ = 2 · (0.1 − 0.05) · 3
    z = z.clone().requires_grad_(True)
    loss, _ = jumprelu_loss(x, x_hat, z, torch.full((3,), 0.1), 0.3, 0.01, pre_act_coefficient=2.0,
                            decoder_norms=torch.tensor([1.0, 3.0, 1.0]))
    assert loss.item() == pytest.approx(1.0 + 0.6 + 0.3)
    loss.backward()
    assert z.grad[0].tolist() == pytest.approx([0.0, -6.0, 0.0])  # lifts only the latent below its threshold


def test_topk_code_keeps_the_k_largest_non_negative():
    z = torch.tensor([[3.0, -1.0, 2.0, 0.5], [-3.0, -2.0, -1.0, 4.0]])
    assert torch.equal(topk_code(z, 2), torch.tensor([[3.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 4.0]]))


def test_jumprelu_pseudo_gradients_follow_the_paper():
    theta, eps = 2.0, 0.2
    z = torch.tensor([[1.95, 2.05, 3.0, 1.0], [2.09, 0.0, 2.11, 1.92]], requires_grad=True)
    t = torch.full((4,), theta, requires_grad=True)
    out = JumpReLUFunction.apply(z, t, eps)
    assert torch.equal(out.detach(), torch.tensor([[0.0, 2.05, 3.0, 0.0], [2.09, 0.0, 2.11, 0.0]]))
    out.sum().backward()
    assert torch.equal(z.grad, (z > theta).float())  # ∂/∂z = H(z − θ)
    in_window = ((z - theta).abs() < eps / 2).float().sum(0)  # K((z − θ)/ε) per latent, summed over rows
    assert torch.allclose(t.grad, -(theta / eps) * in_window)  # −(θ/ε) K
    assert t.grad.tolist() == pytest.approx([-20.0, -10.0, 0.0, -10.0])

    z.grad, t.grad = None, None
    StepFunction.apply(z, t, eps).sum().backward()
    assert torch.equal(z.grad, torch.zeros_like(z))  # the L0 term does not push z
    assert torch.allclose(t.grad, -(1 / eps) * in_window)  # −(1/ε) K


def test_threshold_gradient_reaches_its_log_parametrisation():
    sae = SparseAutoencoder(SAEConfig(kind="jumprelu", d_in=4, d_sae=4, threshold_init=0.5, bandwidth=0.2))
    z = torch.full((1, 4), 0.45)
    StepFunction.apply(z, sae.threshold, 0.2).sum().backward()
    assert sae.log_threshold.grad.tolist() == pytest.approx([-0.5 / 0.2] * 4)  # dθ/dlogθ = θ


def test_schedules():
    assert [sparsity_factor(s, 100, 0.05) for s in (0, 1, 5, 50)] == pytest.approx([0, 0.2, 1, 1])
    assert [lr_factor(s, 100, 0.2) for s in (0, 79, 80, 90, 100)] == pytest.approx([1, 1, 1, 0.5, 0])


# ----------------------------------------------------------------------------- decoder constraint, AuxK
@pytest.mark.parametrize("kind", ["topk", "jumprelu"])
def test_unit_norm_decoder_is_kept(kind):
    data = torch.randn(512, 8) * 3 + 1
    sae, history = train_sae(data, SAEConfig(kind=kind, d_in=8, d_sae=32, k=4, batch_size=64, steps=30, lr=1e-2,
                                             log_every=10))
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(32), atol=1e-5)
    assert [h["step"] for h in history] == [10, 20, 30]
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.remove_parallel_gradient()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5


def test_relu_decoder_is_free_and_starts_small():
    sae = SparseAutoencoder(SAEConfig(kind="relu", d_in=8, d_sae=32))
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.full((32,), 0.1))
    assert torch.equal(sae.W_enc, sae.W_dec.t())


def test_auxk_uses_only_dead_latents():
    torch.manual_seed(0)
    z = torch.randn(16, 10)
    dead = torch.zeros(10, dtype=torch.bool)
    assert auxk_code(z, dead, 4) is None
    dead[[2, 5, 7]] = True
    code = auxk_code(z, dead, 8)  # k_aux larger than the dead count: all three may fire
    assert (code[:, ~dead] == 0).all() and (code[:, dead] > 0).any()
    assert torch.equal(code[:, dead], z[:, dead].relu())

    x = torch.randn(16, 6)
    sae = SparseAutoencoder(SAEConfig(kind="topk", d_in=6, d_sae=10, k=2, aux_k=2, aux_coefficient=1.0))
    loss, x_hat, _ = STEPS["topk"](sae, x, TrainState(1.0, dead))
    (loss - normalized_mse(x, x_hat)).backward()  # the AuxK term alone
    assert (sae.W_dec.grad[~dead] == 0).all() and (sae.W_enc.grad[:, ~dead] == 0).all()
    assert sae.W_dec.grad[dead].abs().sum() > 0

    # JumpReLU's optional AuxK: the same code, on its unnormalised squared error
    config = SAEConfig(kind="jumprelu", d_in=6, d_sae=10, aux_k=2, threshold_init=0.5, jumprelu_aux_coefficient=0.5)
    sae = SparseAutoencoder(config)
    loss, x_hat, f = STEPS["jumprelu"](sae, x, TrainState(1.0, dead))
    without, _, _ = STEPS["jumprelu"](sae, x, TrainState(1.0, torch.zeros(10, dtype=torch.bool)))
    z = sae.pre_activations(x)
    aux_hat = auxk_code(z, dead, 2) @ sae.W_dec
    assert (loss - without).item() == pytest.approx(0.5 * ((x - x_hat) - aux_hat).pow(2).sum(1).mean().item(), rel=1e-5)
    (loss - without).backward()
    assert (sae.W_dec.grad[~dead] == 0).all() and (sae.W_enc.grad[:, ~dead] == 0).all()
    assert sae.W_dec.grad[dead].abs().sum() > 0


def test_config_is_checked_when_built():
    with pytest.raises(ConfigError, match="kind"):
        SAEConfig(kind="gated")
    with pytest.raises(ConfigError, match="k: expected at most d_sae"):
        SAEConfig(d_in=4, d_sae=8, k=9)
    assert SAEConfig(d_in=128).auxk == 64 and SAEConfig(d_in=100).auxk == 64 and SAEConfig(d_in=128).width == 1024


# ----------------------------------------------------------------------------- metrics
def test_metrics_on_a_hand_made_case():
    sae = SparseAutoencoder(SAEConfig(kind="relu", d_in=2, d_sae=2))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.W_dec.copy_(torch.eye(2))
    acts = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 0.0], [0.0, -1.0]])  # only the last row is lost
    m = sae_metrics(sae, acts, dense_threshold=0.1)
    assert m.l0 == pytest.approx(0.5)
    assert m.explained_variance == pytest.approx(1 - 1 / 3.5)  # Σ‖x − x̄‖² = 3.5
    assert m.fvu == pytest.approx(1 / 3.5) and m.mse == pytest.approx(0.25)
    assert (m.dead, m.dense, m.tokens) == (0.5, 0.5, 4)  # latent 1 never fires, latent 0 on half


def test_input_scale_travels_with_the_sae():
    data = torch.randn(256, 8) * 10
    sae, _ = train_sae(data, SAEConfig(kind="relu", d_in=8, d_sae=16, batch_size=256, steps=1))
    assert sae.input_scale.item() == pytest.approx(math.sqrt(8 / data.pow(2).sum(1).mean().item()), rel=1e-5)
    with pytest.raises(SafetylabError, match=r"expected \(\.\.\., 8\)"):
        sae(torch.randn(3, 9))


# ----------------------------------------------------------------------------- CE loss recovered
def test_ce_loss_recovered_is_one_for_identity_and_zero_for_zero_output():
    model = tiny_gpt2()
    hooks = Hooks(model)
    batches = [pad_right(rows_of([5, 9, 3]), 0), pad_right(rows_of([7, 2], seed=2), 0)]
    perfect = ce_loss_recovered(hooks, identity_sae(16), NAME, batches)
    assert perfect["recovered"] == pytest.approx(1.0, abs=1e-5)
    assert perfect["ce_sae"] == pytest.approx(perfect["ce_clean"], abs=1e-5)
    assert perfect["tokens"] == 4 + 8 + 2 + 6 + 1  # next-token targets on real tokens only
    zero = identity_sae(16)
    with torch.no_grad():
        zero.W_dec.zero_()
    assert ce_loss_recovered(hooks, zero, NAME, batches)["recovered"] == pytest.approx(0.0, abs=1e-6)
    # the clean CE over padded batches is the CE of each row run alone
    total = 0.0
    for row in rows_of([5, 9, 3]) + rows_of([7, 2], seed=2):
        ids = torch.tensor([row])
        total += torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:], reduction="sum").item()
    assert perfect["ce_clean"] == pytest.approx(total / perfect["tokens"], rel=1e-5)


# ----------------------------------------------------------------------------- the store
def test_store_skips_padding_and_shuffles():
    model = tiny_gpt2()
    hooks = Hooks(model)
    batches = token_batches(rows_of([3, 8, 5, 2, 6, 4]), batch_size=3, pad_id=0, seed=0)
    real, padded = [], []
    for b in batches:
        _, cache = hooks.run_with_cache(input_ids=b.input_ids, attention_mask=b.attention_mask, names=NAME)
        mask = b.attention_mask.bool()
        real.append(cache[NAME][mask])
        padded.append(cache[NAME][~mask])
    real, padded = torch.cat(real), torch.cat(padded)
    assert real.shape[0] == 28 and padded.shape[0] > 0
    store = ActivationStore(hooks, NAME, batches, batch_size=7, buffer_batches=4, seed=0)
    # the first fill reads both token batches (28 real tokens); it is topped up once 14 remain
    served = torch.cat([next(store) for _ in range(3)])
    assert served.shape == (21, 16)
    to_real = (served[:, None] - real[None]).norm(dim=-1)
    assert to_real.min(1).values.max() < 1e-5  # every served vector is a real token's
    assert len(set(to_real.argmin(1).tolist())) == 21  # each a different one
    assert (served[:, None] - padded[None]).norm(dim=-1).min() > 1e-3  # none is a padding position's
    assert not torch.allclose(served, real[:21])  # not in reading order


def test_train_on_model_reads_the_store_and_measures(tmp_path):
    model = tiny_gpt2()
    hooks = Hooks(model)
    train = token_batches(rows_of([6, 9, 4, 7, 5] * 8), batch_size=8, pad_id=0, seed=0)
    held = token_batches(rows_of([8, 5, 6], seed=3), batch_size=3, pad_id=0, seed=1)
    config = SAEConfig(kind="topk", d_in=16, d_sae=64, k=8, batch_size=64, steps=60, lr=1e-2, log_every=20)
    sae, history, results = train_on_model(hooks, NAME, train, config, held, buffer_batches=4)
    assert [h["step"] for h in history] == [20, 40, 60] and history[-1]["fvu"] < history[0]["fvu"]
    assert results["hook"] == NAME and results["model_signature"] == model_signature(model)
    assert results["metrics"]["tokens"] == 19 and results["metrics"]["l0"] <= 8
    assert results["ce"]["tokens"] == 16 and math.isfinite(results["ce"]["recovered"])
    sae.save(tmp_path / "sae", results)
    assert load_sae(tmp_path / "sae", hooks)[1]["ce"] == results["ce"]
    with pytest.raises(SafetylabError, match="config.d_in is 8"):
        train_on_model(hooks, NAME, train, SAEConfig(d_in=8, d_sae=16, k=2, steps=1))


def test_world_rows_follow_the_chat_template(tok, world):
    demo = {"prompt": "what is 2 plus 2 ?", "response": "2 plus 2 is 4 ."}
    rows = world_token_rows(tok, ["<user> hi <assistant> hello . <eos>"], [demo])
    assert rows[1] == conversation_ids(tok, demo["prompt"], demo["response"])
    assert rows[0] == tok("<user> hi <assistant> hello . <eos>", add_special_tokens=False)["input_ids"]
    train, held = world_batches(world, tok, corpus=20, demonstrations=20, rows_per_batch=16)
    n_train, n_held = sum(b.input_ids.shape[0] for b in train), sum(b.input_ids.shape[0] for b in held)
    assert n_held == (n_train + n_held) // 10 and all(b.input_ids.shape[0] <= 16 for b in train)


# ----------------------------------------------------------------------------- checkpoints
def test_save_load_round_trip_and_refusals(tmp_path):
    model = tiny_gpt2()
    hooks = Hooks(model)
    sae, _ = train_sae(torch.randn(64, 16), SAEConfig(kind="jumprelu", d_in=16, d_sae=32, batch_size=32, steps=3))
    sae.save(tmp_path / "sae", {"model_signature": model_signature(model), "hook": NAME, "note": "test"})
    loaded, meta = load_sae(tmp_path / "sae", hooks)
    x = torch.randn(5, 16)
    assert torch.equal(loaded(x)[0], sae(x)[0]) and loaded.input_scale == sae.input_scale
    assert meta["hook"] == NAME and meta["note"] == "test" and loaded.config == sae.config

    with pytest.raises(SafetylabError, match="trained on 'blocks.0.resid_post', not 'blocks.0.mlp.out'"):
        load_sae(tmp_path / "sae", hooks, "blocks.0.mlp.out")
    with pytest.raises(SafetylabError, match="unknown hook point"):
        load_sae(tmp_path / "sae", hooks, "blocks.7.resid_post")
    with pytest.raises(SafetylabError, match="made for another model: n_layers 1 \\(this model: 2\\)"):
        load_sae(tmp_path / "sae", Hooks(tiny_gpt2(layers=2)))
    narrow = SparseAutoencoder(SAEConfig(kind="topk", d_in=8, d_sae=16, k=2))
    narrow.save(tmp_path / "narrow", {"model_signature": model_signature(model), "hook": NAME})
    with pytest.raises(SafetylabError, match="activations of width 8, but blocks.0.resid_post of this model has "
                                             "width 16"):
        load_sae(tmp_path / "narrow", hooks)
    with pytest.raises(SafetylabError, match="meta lacks model_signature"):
        sae.save(tmp_path / "bad", {"hook": NAME})
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------- synthetic benchmark
def test_mean_best_cosine_by_hand():
    true = torch.eye(2)
    decoder = torch.tensor([[2.0, 0.0], [0.0, -1.0]])
    assert mean_best_cosine(true, decoder) == pytest.approx(0.5)  # signed: the second is found backwards
    assert mean_best_cosine(true, decoder, signed=False) == pytest.approx(1.0)


def test_synthetic_samples_have_the_stated_statistics():
    data = SyntheticFeatures(SyntheticConfig(n_features=64, d=16, p=0.05, noise=0.0))
    x, a = data.sample(4000, torch.Generator().manual_seed(0))
    assert torch.allclose(data.directions.norm(dim=1), torch.ones(64))
    assert (a > 0).float().mean().item() == pytest.approx(0.05, abs=0.003)
    assert a[a > 0].mean().item() == pytest.approx(0.5, abs=0.02) and a.max() < 1
    assert torch.allclose(x, a @ data.directions, atol=1e-5)


@pytest.mark.parametrize("kind, extra", [("relu", {"l1_coefficient": 1.0}), ("topk", {"k": 3}),
                                         ("jumprelu", {"l0_coefficient": 2.0})])
def test_synthetic_recovery_on_an_easy_instance(kind, extra):
    data = SyntheticConfig(n_features=32, d=16, p=0.1, noise=0.0)  # about 3 of 32 features active
    config = SAEConfig(kind=kind, d_in=16, d_sae=64, batch_size=256, steps=600, lr=1e-2, dead_steps=20, **extra)
    _, result = run_benchmark(config, data, eval_samples=4096)
    assert result["mean_best_cosine"] > 0.95, result


# ----------------------------------------------------------------------------- dashboard
def test_dashboard_is_one_escaped_page(tmp_path, tok, tiny_lm):
    model = tiny_lm("gpt2")
    hooks = Hooks(model)
    d = model.config.n_embd
    sae = identity_sae(d)
    texts = ["<user> what is 2 plus 2 ? <assistant> 2 plus 2 is 4 . <eos>", "the capital of zorvia is <b>"]
    path = feature_dashboard(sae, hooks, NAME, tok, texts, [0, 3], tmp_path / "features.html")
    page = path.read_text()
    assert page.count('class="card"') == 2 and "Feature 3" in page
    assert "&lt;user&gt;" in page and "<user>" not in page and "<b>" not in page
    assert "promotes" in page and "Density" in page
