"""safetylab.align.losses and .utils: every loss against a hand-computed or direct-formula reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from safetylab.align.losses import (
    PreferenceLoss,
    bradley_terry_loss,
    dpo_loss,
    entropy_from_logits,
    hinge_loss,
    ipo_loss,
    policy_loss,
    preference_metrics,
    robust_dpo_loss,
    simpo_loss,
    value_loss,
)
from safetylab.align.utils import masked_mean, masked_sum, masked_var, masked_whiten

DPO_LIKE = [dpo_loss, robust_dpo_loss, ipo_loss, hinge_loss]
finite = st.floats(-30, 30, allow_nan=False, allow_infinity=False)
betas = st.floats(1e-3, 5.0)
smoothing = st.floats(0.0, 0.49)


def log_sigmoid(x: float) -> float:
    """log σ(x) in plain Python, stable for either sign."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def pair_logps(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(-torch.rand(n, generator=g, dtype=torch.float64) * 50 for _ in range(4))


def padded(rows: list[list[float]], fill: float = float("nan")) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ragged rows with ``fill``; returns (values, mask)."""
    width = max(len(r) for r in rows)
    x = torch.full((len(rows), width), fill, dtype=torch.float64)
    mask = torch.zeros(len(rows), width, dtype=torch.float64)
    for i, r in enumerate(rows):
        x[i, : len(r)] = torch.tensor(r, dtype=torch.float64)
        mask[i, : len(r)] = 1
    return x, mask


# ---------------------------------------------------------------------------- masked helpers
def test_masked_sum_and_mean_match_numpy_and_ignore_nan_padding():
    rng = np.random.default_rng(0)
    rows = [list(rng.normal(size=n)) for n in (1, 4, 7, 3)]
    x, mask = padded(rows)  # padding holds nan: it must not leak
    np.testing.assert_allclose(masked_sum(x, mask, dim=-1).numpy(), [sum(r) for r in rows])
    np.testing.assert_allclose(masked_mean(x, mask, dim=-1).numpy(), [np.mean(r) for r in rows])
    flat = np.concatenate(rows)
    assert masked_sum(x, mask).item() == pytest.approx(flat.sum())
    assert masked_mean(x, mask).item() == pytest.approx(flat.mean())
    assert masked_mean(x, mask.bool()).item() == pytest.approx(flat.mean())  # bool masks work too


def test_masked_mean_weights_a_float_mask():
    x = torch.tensor([1.0, 2.0, 3.0])
    assert masked_mean(x, torch.tensor([1.0, 0.5, 0.0])).item() == pytest.approx((1 + 1) / 1.5)


def test_masked_helpers_reject_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        masked_sum(torch.zeros(2, 3), torch.ones(2, 4))


@given(st.lists(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=9), min_size=1, max_size=6)
       .filter(lambda rows: sum(len(r) for r in rows) >= 2 and np.ptp(np.concatenate(rows)) > 1e-3))
@settings(deadline=None, max_examples=50)
def test_masked_whiten_zero_mean_unit_unbiased_variance_over_real_tokens(rows):
    x, mask = padded(rows)
    w = masked_whiten(x, mask)
    flat = np.concatenate(rows)
    expected = (flat - flat.mean()) / np.sqrt(flat.var(ddof=1) + 1e-8)
    np.testing.assert_allclose(w[mask.bool()].numpy(), expected, rtol=1e-6, atol=1e-6)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_var(w, mask).item() == pytest.approx(1.0, rel=1e-4)
    assert (w[~mask.bool()] == 0).all()  # padding out is 0, nan padding in did not leak


def test_masked_whiten_ignores_padding_values_and_shift_mean_false_keeps_mean():
    rows = [[1.0, 2.0, 3.0], [10.0]]
    x1, mask = padded(rows, fill=0.0)
    x2, _ = padded(rows, fill=1e6)
    assert torch.equal(masked_whiten(x1, mask), masked_whiten(x2, mask))
    kept = masked_whiten(x1, mask, shift_mean=False)
    assert masked_mean(kept, mask).item() == pytest.approx(4.0)  # mean of 1, 2, 3, 10
    assert torch.allclose(kept[mask.bool()] - 4.0, masked_whiten(x1, mask)[mask.bool()])


def test_masked_var_unbiased_and_needs_two_entries():
    x, mask = padded([[1.0, 2.0], [4.0]])
    assert masked_var(x, mask).item() == pytest.approx(np.var([1, 2, 4], ddof=1))
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(np.var([1, 2, 4]))
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0]))


# ---------------------------------------------------------------------------- Bradley-Terry
@given(st.lists(st.tuples(finite, finite, st.floats(-3, 3)), min_size=1, max_size=8), st.floats(0, 0.1))
@settings(deadline=None, max_examples=60)
def test_bradley_terry_matches_direct_formula(rows, center_coef):
    chosen = torch.tensor([r[0] for r in rows], dtype=torch.float64)
    rejected = torch.tensor([r[1] for r in rows], dtype=torch.float64)
    margin = torch.tensor([r[2] for r in rows], dtype=torch.float64)
    expected = [-log_sigmoid(c - r - m) + center_coef * (c + r) ** 2 for c, r, m in rows]
    got = bradley_terry_loss(chosen, rejected, margin=margin, center_coef=center_coef, reduction="none")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-9)
    assert bradley_terry_loss(chosen, rejected, margin, center_coef).item() == pytest.approx(np.mean(expected))
    assert bradley_terry_loss(chosen, rejected, margin, center_coef, reduction="sum").item() == pytest.approx(
        np.sum(expected))


def test_bradley_terry_without_margin_is_log2_at_a_tie_and_scalar_margin_shifts():
    r = torch.tensor([0.3, -1.2])
    assert bradley_terry_loss(r, r).item() == pytest.approx(math.log(2))
    assert bradley_terry_loss(r + 1.0, r, margin=1.0).item() == pytest.approx(math.log(2))


def test_bradley_terry_gradient_signs_and_centring_gradient():
    g = torch.Generator().manual_seed(1)
    chosen = torch.randn(32, generator=g, dtype=torch.float64, requires_grad=True)
    rejected = torch.randn(32, generator=g, dtype=torch.float64, requires_grad=True)
    bradley_terry_loss(chosen, rejected, margin=0.5).backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()  # raise chosen, lower rejected
    # The BT term depends only on r⁺ − r⁻, so the summed gradient is the centring term's alone: 4η(r⁺ + r⁻)/N.
    c, r = chosen.detach().clone().requires_grad_(), rejected.detach().clone().requires_grad_()
    eta = 0.05
    bradley_terry_loss(c, r, center_coef=eta).backward()
    torch.testing.assert_close(c.grad + r.grad, 4 * eta * (c + r).detach() / 32)


def test_bradley_terry_rejects_bad_arguments():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="reduction"):
        bradley_terry_loss(x, x, reduction="avg")
    with pytest.raises(ValueError, match="center_coef"):
        bradley_terry_loss(x, x, center_coef=-1.0)
    with pytest.raises(ValueError, match="shape"):
        bradley_terry_loss(x, torch.zeros(4))
    with pytest.raises(ValueError, match="margin"):  # [3] against [3, 1] would broadcast to [3, 3]
        bradley_terry_loss(x, x, margin=torch.zeros(3, 1), reduction="none")


def test_bradley_terry_margin_per_pair_or_one_number():
    chosen, rejected = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, 0.5])
    margin = torch.tensor([0.5, 0.0, 1.0])
    per_pair = bradley_terry_loss(chosen, rejected, margin=margin, reduction="none")
    torch.testing.assert_close(per_pair, -torch.nn.functional.logsigmoid(chosen - rejected - margin))
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected, margin=torch.tensor(0.5), reduction="none"),
                               bradley_terry_loss(chosen, rejected, margin=0.5, reduction="none"))


# ---------------------------------------------------------------------------- DPO family
def h_of(pc, pr, rc, rr):
    return (pc - rc) - (pr - rr)


@given(st.lists(st.tuples(finite, finite, finite, finite), min_size=1, max_size=6), betas, smoothing)
@settings(deadline=None, max_examples=80)
def test_dpo_family_match_direct_formulas(rows, beta, eps):
    pc, pr, rc, rr = (torch.tensor([r[i] for r in rows], dtype=torch.float64) for i in range(4))
    hs = [h_of(*r) for r in rows]
    cdpo = [-(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h) for h in hs]
    robust = [(-(1 - eps) * log_sigmoid(beta * h) + eps * log_sigmoid(-beta * h)) / (1 - 2 * eps) for h in hs]
    ipo = [(h - 1 / (2 * beta)) ** 2 for h in hs]
    hinge = [max(0.0, 1 - beta * h) for h in hs]
    for fn, expected, kwargs in [(dpo_loss, cdpo, {"label_smoothing": eps}),
                                 (robust_dpo_loss, robust, {"label_smoothing": eps}),
                                 (ipo_loss, ipo, {}), (hinge_loss, hinge, {})]:
        out = fn(pc, pr, rc, rr, beta=beta, **kwargs)
        assert isinstance(out, PreferenceLoss)
        np.testing.assert_allclose(out.losses.numpy(), expected, rtol=1e-7, atol=1e-7, err_msg=fn.__name__)
        np.testing.assert_allclose(out.chosen_rewards.numpy(), [beta * (r[0] - r[2]) for r in rows], rtol=1e-9)
        np.testing.assert_allclose(out.rejected_rewards.numpy(), [beta * (r[1] - r[3]) for r in rows], rtol=1e-9)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_dpo_beta_to_zero_loss_is_log2_and_gradient_scales_with_beta(eps):
    pc, pr, rc, rr = pair_logps()
    for fn in (dpo_loss, robust_dpo_loss):
        for beta in (1e-4, 1e-6):
            x = pc.clone().requires_grad_()
            out = fn(x, pr, rc, rr, beta=beta, label_smoothing=eps)
            # |L − log 2| ≤ β|h| / (1 − 2ε): each log σ term has slope at most 1 (robust DPO divides by 1 − 2ε)
            h = h_of(pc, pr, rc, rr)
            assert ((out.losses - math.log(2)).abs() <= beta * h.abs() / (1 - 2 * eps) + 1e-12).all()
            out.losses.sum().backward()
            # cDPO:   dL/dh = −β[(1 − ε) σ(−βh) − ε σ(βh)]            → −β (1 − 2ε) / 2
            # robust: dL/dh = −β[(1 − ε) σ(−βh) + ε σ(βh)] / (1 − 2ε)  → −β / (2 (1 − 2ε))
            limit = -0.5 * (1 - 2 * eps) if fn is dpo_loss else -0.5 / (1 - 2 * eps)
            torch.testing.assert_close(x.grad / beta, torch.full_like(pc, limit), atol=1e-2, rtol=0)


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 7.0])
def test_equal_chosen_and_rejected_h_zero(beta):
    pc, _, rc, _ = pair_logps()
    for eps in (0.0, 0.2):
        assert torch.allclose(dpo_loss(pc, pc, rc, rc, beta=beta, label_smoothing=eps).losses,
                              torch.full_like(pc, math.log(2)))
        assert torch.allclose(robust_dpo_loss(pc, pc, rc, rc, beta=beta, label_smoothing=eps).losses,
                              torch.full_like(pc, math.log(2)))
    assert torch.allclose(ipo_loss(pc, pc, rc, rc, beta=beta).losses, torch.full_like(pc, 1 / (4 * beta**2)))
    assert torch.allclose(hinge_loss(pc, pc, rc, rc, beta=beta).losses, torch.ones_like(pc))
    out = dpo_loss(pc, pc, rc, rc, beta=beta)
    assert torch.equal(out.chosen_rewards, out.rejected_rewards)


def test_cdpo_with_zero_smoothing_is_plain_dpo_and_robust_zero_is_dpo():
    pc, pr, rc, rr = pair_logps(seed=3)
    plain = -torch.nn.functional.logsigmoid(0.5 * h_of(pc, pr, rc, rr))
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.0).losses, plain)
    torch.testing.assert_close(robust_dpo_loss(pc, pr, rc, rr, beta=0.5).losses, plain)
    assert not torch.allclose(dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.2).losses, plain)


@given(finite, finite, finite, finite, betas, smoothing)
@settings(deadline=None, max_examples=80)
def test_robust_dpo_is_unbiased_under_label_flips(pc, pr, rc, rr, beta, eps):
    """Chowdhury et al.: if the observed label is flipped with probability ε, the expected robust loss
    (1 − ε) L̂(y_w, y_l) + ε L̂(y_l, y_w) equals the clean DPO loss −log σ(βh)."""
    t = [torch.tensor([v], dtype=torch.float64) for v in (pc, pr, rc, rr)]
    kept = robust_dpo_loss(t[0], t[1], t[2], t[3], beta=beta, label_smoothing=eps).losses
    flipped = robust_dpo_loss(t[1], t[0], t[3], t[2], beta=beta, label_smoothing=eps).losses
    clean = -log_sigmoid(beta * h_of(pc, pr, rc, rr))
    assert ((1 - eps) * kept + eps * flipped).item() == pytest.approx(clean, rel=1e-6, abs=1e-6)


def test_robust_dpo_can_be_negative_unlike_cdpo():
    one = torch.tensor([0.0], dtype=torch.float64)
    big = torch.tensor([100.0], dtype=torch.float64)
    assert robust_dpo_loss(big, one, one, one, beta=1.0, label_smoothing=0.2).losses.item() < 0
    assert dpo_loss(big, one, one, one, beta=1.0, label_smoothing=0.2).losses.item() > 0


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5, 2.0])
def test_ipo_minimum_at_h_equals_one_over_two_beta(beta):
    target = 1 / (2 * beta)
    hs = torch.linspace(target - 5, target + 5, 1001, dtype=torch.float64)
    zero = torch.zeros_like(hs)
    losses = ipo_loss(hs, zero, zero, zero, beta=beta).losses
    assert hs[losses.argmin()].item() == pytest.approx(target, abs=1e-2)
    x = torch.tensor([target], dtype=torch.float64, requires_grad=True)
    z = torch.zeros(1, dtype=torch.float64)
    out = ipo_loss(x, z, z, z, beta=beta).losses
    out.sum().backward()
    assert out.item() == pytest.approx(0.0, abs=1e-12) and x.grad.item() == pytest.approx(0.0, abs=1e-9)


def test_ipo_with_lengths_uses_length_averaged_log_ratios():
    pc, pr, rc, rr = pair_logps(seed=4)
    nc = torch.randint(1, 40, pc.shape, generator=torch.Generator().manual_seed(5)).double()
    nr = torch.randint(1, 40, pc.shape, generator=torch.Generator().manual_seed(6)).double()
    out = ipo_loss(pc, pr, rc, rr, beta=0.1, chosen_lengths=nc, rejected_lengths=nr)
    h = (pc - rc) / nc - (pr - rr) / nr
    torch.testing.assert_close(out.losses, (h - 5.0) ** 2)
    torch.testing.assert_close(out.chosen_rewards, 0.1 * (pc - rc) / nc)
    # Doubling every length and every log-prob (the same per-token log-probs) leaves the averaged loss unchanged.
    torch.testing.assert_close(ipo_loss(2 * pc, 2 * pr, 2 * rc, 2 * rr, beta=0.1, chosen_lengths=2 * nc,
                                        rejected_lengths=2 * nr).losses, out.losses)
    with pytest.raises(ValueError, match="both"):
        ipo_loss(pc, pr, rc, rr, chosen_lengths=nc)
    with pytest.raises(ValueError, match="> 0"):
        ipo_loss(pc, pr, rc, rr, chosen_lengths=nc * 0, rejected_lengths=nr)


def test_hinge_is_zero_beyond_the_margin_and_linear_below():
    beta = 0.5
    hs = torch.tensor([-3.0, 0.0, 1.0, 1.999, 2.0, 2.5, 40.0], dtype=torch.float64, requires_grad=True)
    z = torch.zeros_like(hs)
    losses = hinge_loss(hs, z, z, z, beta=beta).losses
    losses.sum().backward()
    beyond = hs.detach() >= 1 / beta
    assert (losses[beyond] == 0).all() and (hs.grad[beyond] == 0).all()
    torch.testing.assert_close(losses[~beyond], 1 - beta * hs.detach()[~beyond])
    assert (hs.grad[~beyond] == -beta).all()


def test_simpo_matches_formula_and_rewards():
    g = torch.Generator().manual_seed(7)
    lc = -torch.rand(10, generator=g, dtype=torch.float64) * 80
    lr = -torch.rand(10, generator=g, dtype=torch.float64) * 80
    nc, nr = torch.randint(1, 50, (10,), generator=g).double(), torch.randint(1, 50, (10,), generator=g).double()
    out = simpo_loss(lc, lr, nc, nr, beta=2.5, gamma=1.2)
    expected = [-log_sigmoid(2.5 * a / m - 2.5 * b / n - 1.2) for a, b, m, n in zip(lc.tolist(), lr.tolist(),
                                                                                    nc.tolist(), nr.tolist())]
    np.testing.assert_allclose(out.losses.numpy(), expected, rtol=1e-9)
    torch.testing.assert_close(out.chosen_rewards, 2.5 * lc / nc)
    torch.testing.assert_close(out.rejected_rewards, 2.5 * lr / nr)


@given(st.floats(-5, 0), st.integers(1, 500), st.integers(1, 500), st.floats(0.5, 3), st.floats(0, 2))
@settings(deadline=None, max_examples=50)
def test_simpo_length_normalisation(per_token, len_chosen, len_rejected, beta, gamma):
    """Same per-token log-prob → same normalised reward whatever the length: the loss is −log σ(−γ)."""
    lengths_c = torch.tensor([float(len_chosen)], dtype=torch.float64)
    lengths_r = torch.tensor([float(len_rejected)], dtype=torch.float64)
    out = simpo_loss(per_token * lengths_c, per_token * lengths_r, lengths_c, lengths_r, beta=beta, gamma=gamma)
    assert out.chosen_rewards.item() == pytest.approx(beta * per_token, rel=1e-9, abs=1e-12)
    assert out.rejected_rewards.item() == pytest.approx(out.chosen_rewards.item(), rel=1e-9, abs=1e-12)
    assert out.losses.item() == pytest.approx(-log_sigmoid(-gamma), rel=1e-9)


def test_simpo_rejects_bad_lengths():
    x = torch.tensor([-1.0])
    with pytest.raises(ValueError, match="> 0"):
        simpo_loss(x, x, torch.tensor([0.0]), torch.tensor([1.0]))


def test_padding_does_not_change_sequence_level_losses():
    rng = np.random.default_rng(8)
    lens = [rng.integers(1, 12, size=4) for _ in range(4)]  # chosen/rejected for policy and reference
    rows = [[list(-rng.random(n) * 3) for n in lens[0]]]
    rows += [[list(-rng.random(n) * 3) for n in lens[1]]]
    rows.append([list(r_ + rng.normal(size=len(r_)) * 0.1) for r_ in rows[0]])  # reference, same lengths
    rows.append([list(r_ + rng.normal(size=len(r_)) * 0.1) for r_ in rows[1]])
    sums = [torch.tensor([sum(r) for r in group], dtype=torch.float64) for group in rows]
    seqs = []
    for group in rows:
        x, mask = padded(group, fill=float("-inf"))  # padding log-probs of -inf must not leak
        x = torch.cat([x, torch.full((len(group), 5), 123.0, dtype=torch.float64)], dim=1)  # extra padding
        mask = torch.cat([mask, torch.zeros(len(group), 5, dtype=torch.float64)], dim=1)
        seqs.append(masked_sum(x, mask, dim=-1))
    for fn in DPO_LIKE:
        torch.testing.assert_close(fn(*seqs, beta=0.2).losses, fn(*sums, beta=0.2).losses)


@pytest.mark.parametrize("fn", DPO_LIKE)
def test_dpo_family_validates_beta_and_shapes(fn):
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="beta"):
        fn(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="shape"):
        fn(x, x, x, torch.zeros(2), beta=0.1)
    with pytest.raises(ValueError, match="beta"):
        simpo_loss(x - 1, x - 1, x + 1, x + 1, beta=-1.0)


@pytest.mark.parametrize("eps", [-0.1, 0.5, 0.7])
def test_label_smoothing_out_of_range_is_an_error(eps):
    x = torch.zeros(3)
    for fn in (dpo_loss, robust_dpo_loss):
        with pytest.raises(ValueError, match="label_smoothing"):
            fn(x, x, x, x, label_smoothing=eps)


def test_policy_gradient_flows_to_policy_logps_and_rewards_are_detached():
    pc, pr, rc, rr = (t.clone().requires_grad_() for t in pair_logps(seed=9))
    out = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert out.losses.requires_grad and not out.chosen_rewards.requires_grad
    out.losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # raise the chosen, lower the rejected


def test_preference_metrics_trl_keys_and_values():
    chosen = torch.tensor([1.0, 0.5, -1.0, 2.0])
    rejected = torch.tensor([0.0, 0.5, 1.0, -2.0])  # a tie counts as not accurate
    lc, lr = torch.tensor([-10.0, -20.0, -30.0, -40.0]), torch.tensor([-1.0, -2.0, -3.0, -4.0])
    m = preference_metrics(chosen, rejected, lc, lr)
    assert m == {
        "rewards/chosen": pytest.approx(0.625), "rewards/rejected": pytest.approx(-0.125),
        "rewards/margins": pytest.approx(0.75), "rewards/accuracies": pytest.approx(0.5),
        "logps/chosen": pytest.approx(-25.0), "logps/rejected": pytest.approx(-2.5),
    }
    assert all(type(v) is float for v in m.values())


# ---------------------------------------------------------------------------- PPO
def test_policy_loss_equals_unclipped_surrogate_inside_the_clip_range():
    g = torch.Generator().manual_seed(10)
    old = -torch.rand(4, 9, generator=g, dtype=torch.float64) * 4
    new = (old + (torch.rand(4, 9, generator=g, dtype=torch.float64) - 0.5) * 0.3).requires_grad_()  # |log ρ| ≤ .15
    adv = torch.randn(4, 9, generator=g, dtype=torch.float64)
    _, mask = padded([[0.0] * n for n in (9, 3, 6, 1)])
    loss, stats = policy_loss(new, old, adv, mask, clip=0.2)
    ratio = torch.exp(new - old)
    surrogate = -(adv * ratio * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, surrogate)
    assert stats["clipfrac"].item() == 0.0
    torch.testing.assert_close(stats["approxkl"], 0.5 * (((new - old) ** 2) * mask).sum().detach() / mask.sum())
    (g_loss,) = torch.autograd.grad(loss, new)
    (g_surr,) = torch.autograd.grad(surrogate, new)
    torch.testing.assert_close(g_loss, g_surr)


def test_policy_loss_clipfrac_counts_exactly_the_clipped_tokens():
    c = 0.2
    ratio = torch.tensor([[1.5, 1.5, 0.5, 0.5, 1.1, 9.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0, 2.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.float64)  # the last (padding) would be clipped
    logp = torch.log(ratio).requires_grad_()
    old = torch.zeros_like(ratio)
    loss, stats = policy_loss(logp, old, adv, mask, clip=c)
    # active clipping: ρ > 1 + c with A > 0, and ρ < 1 − c with A < 0 → tokens 0 and 2 of 5
    assert stats["clipfrac"].item() == pytest.approx(2 / 5)
    per_token = [-1.2, 1.5, 0.8, -0.5, -2.2]  # max(−Aρ, −A clip(ρ)) by hand
    assert loss.item() == pytest.approx(sum(per_token) / 5)
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 2] == 0 and logp.grad[0, 5] == 0
    assert (logp.grad[0, [1, 3, 4]] != 0).all()


def test_policy_loss_matches_numpy_reference_on_random_inputs():
    rng = np.random.default_rng(11)
    old = -rng.random((5, 8)) * 3
    new = old + rng.normal(size=(5, 8)) * 0.5
    adv = rng.normal(size=(5, 8))
    mask = (rng.random((5, 8)) < 0.7).astype(float)
    mask[0, 0] = 1
    ratio = np.exp(new - old)
    per = np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.2))
    loss, stats = policy_loss(*(torch.tensor(a) for a in (new, old, adv, mask)))
    assert loss.item() == pytest.approx((per * mask).sum() / mask.sum())
    clipped = (-adv * np.clip(ratio, 0.8, 1.2) > -adv * ratio)
    assert stats["clipfrac"].item() == pytest.approx((clipped * mask).sum() / mask.sum())
    assert stats["approxkl"].item() == pytest.approx(0.5 * ((new - old) ** 2 * mask).sum() / mask.sum())
    assert stats["ratio"].item() == pytest.approx((ratio * mask).sum() / mask.sum())


def test_value_loss_unclipped_inside_range_and_clipfrac_counts_clipped_tokens():
    old = torch.zeros(1, 5, dtype=torch.float64)
    values = torch.tensor([[0.1, -0.15, 1.0, -1.0, 0.5]], dtype=torch.float64, requires_grad=True)
    returns = torch.tensor([[2.0, 0.0, 0.0, -3.0, 0.4]], dtype=torch.float64)
    mask = torch.ones(1, 5, dtype=torch.float64)
    loss, stats = value_loss(values, old, returns, mask, clip=0.2)
    v = values.detach()
    vclip = old + torch.clamp(v - old, -0.2, 0.2)
    err = torch.maximum((v - returns) ** 2, (vclip - returns) ** 2)
    assert loss.item() == pytest.approx(0.5 * err.mean().item())
    # Clipping binds where V moved past the clip range *towards* R: token 3 (V=−1, R=−3, V_clip=−0.2) and
    # token 4 (V=.5, R=.4, V_clip=.2). Tokens 0, 1 lie inside the range; token 2 (V=1, R=0) moved away from
    # R, so its unclipped error is the larger one.
    assert stats["clipfrac"].item() == pytest.approx(2 / 5)
    loss.backward()
    assert values.grad[0, 3] == 0 and values.grad[0, 4] == 0 and (values.grad[0, [0, 1, 2]] != 0).all()
    # Inside the clip range everywhere it is plain ½ mean (V − R)².
    small = (torch.rand(3, 4, dtype=torch.float64) - 0.5) * 0.2
    ret = torch.randn(3, 4, dtype=torch.float64)
    loss2, stats2 = value_loss(small, torch.zeros(3, 4, dtype=torch.float64), ret, torch.ones(3, 4))
    assert loss2.item() == pytest.approx(0.5 * ((small - ret) ** 2).mean().item())
    assert stats2["clipfrac"].item() == 0.0


def test_value_loss_matches_numpy_reference_on_random_inputs():
    rng = np.random.default_rng(13)
    old = rng.normal(size=(4, 7)) * 3
    values = old + rng.normal(size=(4, 7)) * 0.4
    returns = old + rng.normal(size=(4, 7))
    mask = (rng.random((4, 7)) < 0.7).astype(float)
    mask[0, 0] = 1
    vclip = old + np.clip(values - old, -0.2, 0.2)
    err = np.maximum((values - returns) ** 2, (vclip - returns) ** 2)
    loss, stats = value_loss(*(torch.tensor(a) for a in (values, old, returns, mask)), clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (err * mask).sum() / mask.sum())
    clipped = (vclip - returns) ** 2 > (values - returns) ** 2
    assert 0 < stats["clipfrac"].item() == pytest.approx((clipped * mask).sum() / mask.sum())


def test_value_loss_ignores_padding():
    values = torch.tensor([[0.1, float("nan")]])
    old = torch.tensor([[0.0, 5.0]])
    returns = torch.tensor([[0.3, 1e9]])
    loss, _ = value_loss(values, old, returns, torch.tensor([[1.0, 0.0]]))
    assert loss.item() == pytest.approx(0.5 * 0.2**2)


def test_ppo_losses_validate_clip():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="clip"):
        policy_loss(x, x, x, x, clip=0.0)
    with pytest.raises(ValueError, match="clip"):
        value_loss(x, x, x, x, clip=-1.0)


def test_entropy_from_logits_matches_torch_categorical():
    logits = torch.randn(3, 4, 11, generator=torch.Generator().manual_seed(12)) * 3
    expected = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(entropy_from_logits(logits), expected, rtol=1e-5, atol=1e-5)
    assert entropy_from_logits(torch.zeros(7)).item() == pytest.approx(math.log(7), rel=1e-6)
    assert entropy_from_logits(torch.tensor([0.0, 100.0, 0.0])).item() == pytest.approx(0.0, abs=1e-6)
