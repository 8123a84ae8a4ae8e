import copy
import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from sklearn.metrics import roc_auc_score

from safetylab.core.errors import SafetylabError
from safetylab.robust.shift import (
    BLUR_SIGMAS,
    BRIGHTNESS_OFFSETS,
    CONTRAST_FACTORS,
    FEATURE_DRIFTS,
    FEATURE_DROP_SHARES,
    FEATURE_LOG_GAINS,
    FEATURE_NOISE_STDS,
    FEATURE_SHIFTS,
    IMAGE_SHIFTS,
    NOISE_STDS,
    OCCLUSION_FRACTIONS,
    ROTATION_DEGREES,
    SEVERITIES,
    TRANSLATION_FRACTIONS,
    blur,
    brightness,
    contrast,
    feature_dropout,
    feature_noise,
    feature_scale,
    feature_shift,
    gaussian_blur,
    gaussian_noise,
    occlusion,
    plot_shift,
    rotate,
    rotation,
    shift_report,
    synthetic_ood,
    translate,
    translation,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def one_hot_image(h: int, w: int, row: int, col: int) -> torch.Tensor:
    x = torch.zeros(1, 1, h, w)
    x[0, 0, row, col] = 1.0
    return x


# ----------------------------------------------------------------------------- every image family
@pytest.mark.parametrize("name", list(IMAGE_SHIFTS))
def test_image_shift_keeps_shape_range_and_repeats(name, digits):
    shift = IMAGE_SHIFTS[name]
    colour = torch.rand(3, 3, 28, 32, generator=gen(1))  # non-square RGB images
    for x in (digits.x_test[:64], colour):
        for severity in SEVERITIES:
            out = shift(x, severity, gen(0))
            assert out.shape == x.shape and out.dtype == x.dtype
            assert out.min() >= 0 and out.max() <= 1
            assert torch.equal(out, shift(x, severity, gen(0)))
    assert not torch.equal(shift(colour, 5, gen(0)), colour)


@pytest.mark.parametrize("name", list(IMAGE_SHIFTS))
def test_image_severity_is_monotone(name, digits):
    x = digits.x_test
    change = [(IMAGE_SHIFTS[name](x, s, gen(0)) - x).abs().mean().item() for s in SEVERITIES]
    assert all(a <= b + 1e-7 for a, b in zip(change, change[1:])), change
    assert change[-1] > change[0]


def test_random_families_depend_on_the_seed(digits):
    x = digits.x_test[:64]
    for name in ("gaussian_noise", "rotation", "translation", "occlusion"):
        assert not torch.equal(IMAGE_SHIFTS[name](x, 3, gen(0)), IMAGE_SHIFTS[name](x, 3, gen(1))), name


# ----------------------------------------------------------------------------- each image family
def test_gaussian_noise_adds_clipped_scaled_normal_noise():
    x = torch.rand(4, 2, 5, 5, generator=gen(3))
    for severity in SEVERITIES:
        expected = np.clip(x.numpy() + NOISE_STDS[severity - 1] * torch.randn(x.shape, generator=gen(7)).numpy(), 0, 1)
        np.testing.assert_allclose(gaussian_noise(x, severity, gen(7)).numpy(), expected, atol=1e-6)


def test_blur_matches_scipy_and_keeps_a_constant_image():
    x = torch.rand(2, 3, 9, 11, generator=gen(2))
    for severity in SEVERITIES:
        sigma = BLUR_SIGMAS[severity - 1]
        out = blur(x, severity)
        for n in range(2):
            for c in range(3):
                ref = gaussian_filter(x[n, c].double().numpy(), sigma, mode="nearest", radius=math.ceil(3 * sigma))
                np.testing.assert_allclose(out[n, c].numpy(), ref, atol=1e-5)
        flat = torch.full((1, 1, 8, 8), 0.37)
        np.testing.assert_allclose(blur(flat, severity).numpy(), 0.37, atol=1e-6)


def test_blur_keeps_float64_precision():
    """The kernel is built in float64 and cast to the images' dtype (it was rounded to float32 first)."""
    x = torch.rand(1, 2, 9, 11, generator=gen(5), dtype=torch.float64)
    for sigma in BLUR_SIGMAS:
        ref = [gaussian_filter(x[0, c].numpy(), sigma, mode="nearest", radius=math.ceil(3 * sigma)) for c in range(2)]
        np.testing.assert_allclose(gaussian_blur(x, sigma)[0].numpy(), np.stack(ref), rtol=0, atol=1e-14)
        flat = torch.full((1, 1, 8, 8), 0.37, dtype=torch.float64)
        np.testing.assert_allclose(gaussian_blur(flat, sigma).numpy(), 0.37, rtol=0, atol=1e-15)


def test_contrast_pulls_each_image_towards_its_mean():
    x = torch.tensor([0.0, 1.0, 0.2, 0.6]).view(1, 1, 2, 2)  # mean 0.45
    np.testing.assert_allclose(contrast(x, 1).flatten().numpy(), [0.1125, 0.8625, 0.2625, 0.5625], atol=1e-6)
    images = torch.rand(3, 3, 6, 6, generator=gen(4))
    for severity in SEVERITIES:
        out = contrast(images, severity)
        np.testing.assert_allclose(out.mean((2, 3)).numpy(), images.mean((2, 3)).numpy(), atol=1e-6)
        ratio = out.std((2, 3)) / images.std((2, 3))
        np.testing.assert_allclose(ratio.numpy(), CONTRAST_FACTORS[severity - 1], rtol=1e-4)


def test_brightness_adds_and_clips():
    x = torch.tensor([0.0, 0.3, 0.55, 0.95]).view(1, 1, 2, 2)
    for severity in SEVERITIES:
        expected = np.minimum(x.numpy() + BRIGHTNESS_OFFSETS[severity - 1], 1.0)
        np.testing.assert_allclose(brightness(x, severity).numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(brightness(x, 3).flatten().numpy(), [0.3, 0.6, 0.85, 1.0], atol=1e-6)


def test_rotate_by_zero_is_identity_and_by_ninety_is_rot90():
    x = torch.rand(2, 3, 7, 7, generator=gen(5))
    torch.testing.assert_close(rotate(x, 0.0), x, atol=1e-6, rtol=0)
    torch.testing.assert_close(rotate(x, 90.0), torch.rot90(x, 1, (2, 3)), atol=1e-5, rtol=0)  # counter-clockwise
    torch.testing.assert_close(rotate(x, -90.0), torch.rot90(x, -1, (2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(rotate(x, 360.0), x, atol=1e-5, rtol=0)
    # A pixel at the centre of a non-square image stays; one per image may be given.
    centre = one_hot_image(9, 15, 4, 7).repeat(2, 1, 1, 1)
    torch.testing.assert_close(rotate(centre, torch.tensor([30.0, -50.0]))[:, :, 4, 7], torch.ones(2, 1))


def test_rotation_turns_each_image_by_plus_or_minus_the_severity_angle(digits):
    x = digits.x_test[:40]
    for severity in (1, 5):
        out = rotation(x, severity, gen(0))
        alpha = ROTATION_DEGREES[severity - 1]
        plus, minus = rotate(x, alpha), rotate(x, -alpha)
        is_plus = (out - plus).flatten(1).abs().amax(1) < 1e-6
        is_minus = (out - minus).flatten(1).abs().amax(1) < 1e-6
        assert (is_plus | is_minus).all() and is_plus.any() and is_minus.any()


def test_translate_moves_a_pixel_by_whole_pixels():
    x = one_hot_image(8, 10, 3, 4)
    for dx, dy in [(2, 0), (0, 3), (-3, 1), (1, -2), (5, 4)]:
        out = translate(x, float(dx), float(dy))
        expected = one_hot_image(8, 10, 3 + dy, 4 + dx)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert translate(x, 7.0, 0.0).sum() == 0  # moved out of the image


def test_translation_moves_each_image_by_the_severity_fraction():
    h, w = 16, 40  # non-square: the move is f·W across and f·H down at most
    x = one_hot_image(h, w, 8, 20).repeat(32, 1, 1, 1)
    rows, cols = torch.arange(h).view(1, 1, -1, 1).float(), torch.arange(w).view(1, 1, 1, -1).float()
    for severity in SEVERITIES:
        f = TRANSLATION_FRACTIONS[severity - 1]
        out = translation(x, severity, gen(0))
        torch.testing.assert_close(out.sum((1, 2, 3)), torch.ones(32))  # bilinear moves keep the mass
        dy, dx = (out * rows).sum((1, 2, 3)) - 8, (out * cols).sum((1, 2, 3)) - 20  # centroid displacement
        torch.testing.assert_close((dx / (f * w)) ** 2 + (dy / (f * h)) ** 2, torch.ones(32), atol=1e-3, rtol=0)
        assert (dx > 0).any() and (dx < 0).any() and (dy > 0).any() and (dy < 0).any()  # random directions


def test_occlusion_is_a_growing_square_patch():
    x = torch.ones(64, 1, 20, 20)
    previous = torch.zeros_like(x, dtype=torch.bool)
    for severity in SEVERITIES:
        side = math.floor(OCCLUSION_FRACTIONS[severity - 1] * 20 + 0.5)  # 3, 5, 8, 10, 13
        hole = occlusion(x, severity, gen(0)) == 0
        rows, cols = hole.any(3)[:, 0], hole.any(2)[:, 0]
        # the zeros fill the box spanned by their rows and columns: a rectangle, cut from a side × side square
        assert torch.equal(hole.sum((1, 2, 3)), rows.sum(1) * cols.sum(1))
        assert rows.sum(1).max() == side and cols.sum(1).max() == side
        assert (hole.sum((1, 2, 3)) == side**2).any()
        assert (previous <= hole).all()  # the same patch grows
        previous = hole
    noisy = occlusion(x, 5, gen(0), fill="noise")
    changed = noisy != 1
    assert (changed <= previous).all() and changed.sum() > 0.95 * previous.sum()
    assert noisy[changed].std() > 0.2  # U[0, 1) values, not a constant


# ----------------------------------------------------------------------------- feature vectors
def test_feature_shifts_keep_shape_repeat_and_clip_only_with_bounds():
    x = torch.rand(50, 6, generator=gen(8))
    for name, shift in FEATURE_SHIFTS.items():
        for severity in SEVERITIES:
            out = shift(x, severity, gen(0))
            assert out.shape == x.shape and torch.equal(out, shift(x, severity, gen(0))), name
        bounded = shift(x, 5, gen(0), bounds=(0.0, 1.0))
        assert bounded.min() >= 0 and bounded.max() <= 1
        torch.testing.assert_close(bounded, shift(x, 5, gen(0)).clamp(0, 1))
    assert (feature_noise(x, 5, gen(0)) > 1).any() and (feature_shift(x, 5, gen(3)) < 0).any()


def test_feature_noise_is_scaled_by_each_feature_std():
    std = torch.tensor([0.1, 1.0, 10.0])
    x = torch.zeros(40_000, 3)
    for severity in (1, 5):
        noise = (feature_noise(x, severity, gen(0), std=std) - x).numpy()
        np.testing.assert_allclose(noise.std(0), FEATURE_NOISE_STDS[severity - 1] * std.numpy(), rtol=0.03)
    reference = torch.randn(500, 3, generator=gen(1)) * torch.tensor([1.0, 2.0, 3.0])
    from_reference = feature_noise(x[:10], 2, gen(0), reference=reference)
    given = feature_noise(x[:10], 2, gen(0), std=torch.tensor(reference.numpy().std(0, ddof=1)))
    torch.testing.assert_close(from_reference, given)
    data = torch.randn(300, 3, generator=gen(2)) * torch.tensor([0.5, 1.0, 4.0])
    torch.testing.assert_close(feature_noise(data, 2, gen(0)), feature_noise(data, 2, gen(0), reference=data))


def test_feature_dropout_zeroes_the_same_growing_columns():
    x = torch.rand(30, 20, generator=gen(9)) + 0.5
    previous = torch.zeros(20, dtype=torch.bool)
    for severity in SEVERITIES:
        zero = feature_dropout(x, severity, gen(0)) == 0
        columns = zero.all(0)
        assert torch.equal(zero, columns.expand_as(zero))  # the same features in every row
        assert columns.sum() == math.ceil(FEATURE_DROP_SHARES[severity - 1] * 20)
        assert (previous <= columns).all()
        previous = columns


def test_feature_scale_is_a_per_feature_gain_growing_with_severity():
    x = torch.rand(30, 5, generator=gen(10)) + 0.1
    log_gains = [torch.log(feature_scale(x, s, gen(0)) / x) for s in SEVERITIES]
    z = log_gains[0][0] / FEATURE_LOG_GAINS[0]
    for severity, log_gain in zip(SEVERITIES, log_gains):
        torch.testing.assert_close(log_gain, (FEATURE_LOG_GAINS[severity - 1] * z).expand_as(x), atol=1e-5, rtol=1e-4)


def test_feature_shift_moves_every_row_by_delta_feature_stds():
    x = torch.randn(200, 8, generator=gen(11)) * torch.arange(1.0, 9.0)
    std = x.std(0)
    for severity in SEVERITIES:
        move = feature_shift(x, severity, gen(0)) - x
        torch.testing.assert_close(move, move[:1].expand_as(move), atol=1e-5, rtol=0)
        rms = (move[0] / std).pow(2).mean().sqrt().item()
        assert rms == pytest.approx(FEATURE_DRIFTS[severity - 1], rel=1e-4)


# ----------------------------------------------------------------------------- synthetic OOD
def test_synthetic_ood_kinds():
    uniform = synthetic_ood(400, (1, 8, 8), "uniform", gen(0))
    assert uniform.shape == (400, 1, 8, 8)
    assert uniform.mean().item() == pytest.approx(0.5, abs=0.01)
    assert uniform.var().item() == pytest.approx(1 / 12, abs=0.003)
    gaussian = synthetic_ood(400, (3, 4, 4), "gaussian", gen(0))
    clipped = ((gaussian == 0) | (gaussian == 1)).float().mean().item()
    assert clipped == pytest.approx(1 - math.erf(2 / math.sqrt(2)), abs=0.01)  # P(|N(0.5, 0.25²) − 0.5| > 0.5)
    blobs = synthetic_ood(200, (1, 16, 16), "blobs", gen(0))
    assert ((blobs == 0) | (blobs >= 0.75)).all()
    on = blobs > 0
    q = on.float().mean().item()
    assert 0.05 < q < 0.95
    differ = (on[..., 1:] != on[..., :-1]).float().mean().item()
    assert differ < 0.6 * 2 * q * (1 - q)  # neighbours agree far more than for independent pixels
    for kind in ("uniform", "gaussian", "blobs"):
        out = synthetic_ood(5, (3, 8, 8), kind, gen(1))
        assert out.min() >= 0 and out.max() <= 1 and torch.equal(out, synthetic_ood(5, (3, 8, 8), kind, gen(1)))
    assert synthetic_ood(3, (10,), "gaussian", gen(0)).shape == (3, 10)


# ----------------------------------------------------------------------------- report and plot
class NegMaxProb:
    """A stand-in detector: −max softmax probability (higher = more anomalous)."""

    def __init__(self, model):
        self.model = model

    def score(self, x):
        with torch.no_grad():
            return -self.model(x).softmax(1).max(1).values


def test_shift_report_on_digits(digits, digits_model, tmp_path):
    model = copy.deepcopy(digits_model)
    before = [p.clone() for p in model.parameters()]
    x, y = digits.x_test, digits.y_test
    rows = shift_report(model, x, y)
    assert len(rows) == 1 + len(IMAGE_SHIFTS) * 5
    assert [(r["shift"], r["severity"]) for r in rows] == [("none", 0)] + [
        (name, s) for name in IMAGE_SHIFTS for s in SEVERITIES]
    assert all(set(r) == {"shift", "severity", "accuracy", "ece", "nll", "brier"} for r in rows)
    with torch.no_grad():
        clean_acc = (model(x).argmax(1) == y).float().mean().item()
    by = {(r["shift"], r["severity"]): r for r in rows}
    assert by["none", 0]["accuracy"] == pytest.approx(clean_acc) and clean_acc > 0.9
    for name in ("gaussian_noise", "blur", "occlusion"):
        assert by[name, 5]["accuracy"] < clean_acc, name
        assert by[name, 5]["nll"] > by["none", 0]["nll"], name
    with torch.no_grad():
        shifted = blur(x, 3)
        probs = model(shifted).softmax(1)
    onehot = torch.nn.functional.one_hot(y, 8).float()
    assert by["blur", 3]["brier"] == pytest.approx((probs - onehot).pow(2).sum(1).mean().item(), rel=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))

    path = plot_shift(rows, tmp_path / "shift.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["shift.png"]  # no temporary file left
    with pytest.raises(SafetylabError, match="ood_auroc"):
        plot_shift(rows, tmp_path / "auroc.png", metric="ood_auroc")


def test_shift_report_with_a_detector(digits, digits_model, tmp_path):
    model = copy.deepcopy(digits_model)
    x, y = digits.x_test[:200], digits.y_test[:200]
    detector = NegMaxProb(model)
    shifts = {"gaussian_noise": gaussian_noise, "contrast": contrast}
    rows = shift_report(model, x, y, shifts=shifts, severities=(1, 5), detector=detector, seed=3)
    assert rows == shift_report(model, x, y, shifts=shifts, severities=(1, 5), detector=detector, seed=3)
    clean = detector.score(x)
    assert rows[0]["ood_auroc"] is None and rows[0]["ood_score"] == pytest.approx(clean.mean().item())
    noisy = detector.score(gaussian_noise(x, 5, gen(3)))
    expected = roc_auc_score(np.r_[np.zeros(200), np.ones(200)], np.r_[clean.numpy(), noisy.numpy()])
    row = next(r for r in rows if r["shift"] == "gaussian_noise" and r["severity"] == 5)
    assert row["ood_auroc"] == pytest.approx(expected) and row["ood_auroc"] > 0.5
    assert row["ood_score"] == pytest.approx(noisy.mean().item())
    plot_shift(rows, tmp_path / "auroc.png", metric="ood_auroc")
    assert (tmp_path / "auroc.png").stat().st_size > 1000


def test_shift_report_keeps_float64_detector_scores(digits, digits_model):
    """Scores that differ below float32's resolution still rank (they were cast to float32 and tied)."""
    class Brightness:  # float64 scores: 1 + 1e-9 · mean pixel, higher for brighter inputs
        def score(self, x):
            return 1 + 1e-9 * x.flatten(1).double().mean(1)

    x, y = digits.x_test[:50], digits.y_test[:50]
    rows = shift_report(digits_model, x, y, shifts={"brightness": brightness}, severities=(3,), detector=Brightness())
    assert rows[1]["ood_auroc"] == 1.0


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("severity", [0, 6, -1, 2.5, True, "3"])
def test_bad_severity(severity):
    x = torch.rand(2, 1, 8, 8)
    for shift in (*IMAGE_SHIFTS.values(), *FEATURE_SHIFTS.values()):
        with pytest.raises(SafetylabError, match="severity"):
            shift(x if shift in IMAGE_SHIFTS.values() else x.flatten(1), severity, gen(0))


def test_bad_inputs(digits_model):
    for shift in IMAGE_SHIFTS.values():
        with pytest.raises(SafetylabError, match=r"\(N, C, H, W\)"):
            shift(torch.rand(2, 8, 8), 1, gen(0))
        with pytest.raises(SafetylabError, match=r"\[0.0, 1.0\]"):
            shift(torch.rand(2, 1, 8, 8) + 0.5, 1, gen(0))
        with pytest.raises(SafetylabError, match="NaN"):
            shift(torch.full((2, 1, 8, 8), float("nan")), 1, gen(0))
        with pytest.raises(SafetylabError, match="float"):
            shift(torch.ones(2, 1, 8, 8, dtype=torch.long), 1, gen(0))
    for shift in FEATURE_SHIFTS.values():
        with pytest.raises(SafetylabError, match=r"\(N, D\)"):
            shift(torch.rand(2, 1, 8, 8), 1, gen(0))
        with pytest.raises(SafetylabError, match="bounds|x must lie"):
            shift(torch.rand(4, 3) * 2, 1, gen(0), bounds=(0.0, 1.0))
    with pytest.raises(SafetylabError, match="std must hold"):
        feature_noise(torch.rand(4, 3), 1, std=torch.ones(2))
    with pytest.raises(SafetylabError, match="not both"):
        feature_shift(torch.rand(4, 3), 1, std=torch.ones(3), reference=torch.rand(4, 3))
    with pytest.raises(SafetylabError, match="at least 2"):
        feature_noise(torch.rand(1, 3), 1)
    with pytest.raises(SafetylabError, match="fill"):
        occlusion(torch.rand(2, 1, 8, 8), 1, fill="mean")
    with pytest.raises(SafetylabError, match="kind"):
        synthetic_ood(2, (1, 8, 8), "rademacher")
    with pytest.raises(SafetylabError, match="n must"):
        synthetic_ood(0, (1, 8, 8))
    with pytest.raises(SafetylabError, match="shape"):
        synthetic_ood(2, (1, 0, 8))
    with pytest.raises(SafetylabError, match=r"\(C, H, W\)"):
        synthetic_ood(2, (64,), "blobs")
    x, y = torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
    model = copy.deepcopy(digits_model).train()
    with pytest.raises(SafetylabError, match="training mode"):
        shift_report(model, x, y)
    model.eval()
    with pytest.raises(SafetylabError, match='"none"'):
        shift_report(model, x, y, shifts={"none": blur})
    with pytest.raises(SafetylabError, match="severity"):
        shift_report(model, x, y, severities=(0, 1))
    with pytest.raises(SafetylabError, match="4 inputs"):
        shift_report(model, x, y[:3])
    with pytest.raises(SafetylabError, match="one score per input"):
        shift_report(model, x, y, shifts={"blur": blur}, detector=type("D", (), {"score": lambda s, x: x.sum()})())
    with pytest.raises(SafetylabError, match="rows"):
        plot_shift([], "unused.png")
