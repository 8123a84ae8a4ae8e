"""Robustness tools: safetylab's PGD and OOD detectors against torchattacks, ART and pytorch-ood.

Everything runs on one model and one batch: the digits CNN (``safetylab.models.classifier.digits_cnn``)
trained for ``--epochs`` epochs by ``train_classifier`` on ``load_digits(0)``'s training split, in eval
mode, and a batch of ``--batch`` images (inputs in [0, 1]) drawn with a fixed seed from the train,
validation and test images together (with repetition only if the batch is larger than all of them). CPU,
``--threads`` torch threads (1 by default); numpy, BLAS and OpenMP pools (scikit-learn, ART) are held to
the same number with threadpoolctl.

PGD, L∞, ε = 0.1, 20 steps of size α = 2.5·ε/20, one random start, untargeted, cross-entropy; one call
attacks the whole batch and is timed from the call to the returned adversarial batch:

- *safetylab*: ``safetylab.robust.attacks.pgd(model, x, y, eps, steps=20)`` with its default
  ``early_stop=True`` (a point leaves the batch once it is fooled and keeps that x′: part of the
  algorithm, since an evaluation only asks whether some x′ fools the model), and with
  ``early_stop=False`` (every point takes all 20 steps, the work the peers do);
- *torchattacks*: ``PGD(model, eps, alpha, steps=20, random_start=True)(x, y)``;
- *ART*: ``ProjectedGradientDescent`` (its PyTorch implementation) on a ``PyTorchClassifier`` (loss
  ``CrossEntropyLoss``, ``input_shape``, ``nb_classes``, ``clip_values=(0, 1)``, CPU), ``norm=inf``,
  ``eps``, ``eps_step=α``, ``max_iter=20``, ``num_random_init=1``, ``batch_size`` = the batch,
  ``verbose=False``; ``generate(x, y)`` on numpy arrays (ART's interface: the batch is converted to numpy
  once, outside the timing; the conversion is zero-copy), on a copy of the model with frozen parameters
  (``requires_grad_(False)``: its ``loss.backward()`` would otherwise fill the parameters' gradients too).
  ART's own per-call work is included: its labels are made one-hot, and it predicts the clean and the
  adversarial batch once more to log the success rate;
- *floor*: the same 20 steps in plain PyTorch: uniform random start, clamp to [0, 1], then per step a
  forward, mean cross-entropy, ``torch.autograd.grad`` with respect to x, a signed step, the projection
  onto the ball and the clamp.

All sides get the same step size, so their attacks are the same but for the random draws; agreement is
checked on the robust accuracy (argmax f(x′) = y over the batch), each side against the floor, within
``PGD_TOLERANCE`` (on 512 points, random starts alone move it by about a point), and every x′ is checked
to lie in the ball and in [0, 1].

OOD detectors, fitted on the training split (features of the training images for Mahalanobis and KNN),
scoring the batch: safetylab's ``MSP``, ``Energy``, ``ODIN``, ``Mahalanobis`` and ``KNN``
(``safetylab.robust.ood``) against pytorch-ood's ``MaxSoftmax``, ``EnergyBased``, ``ODIN``,
``Mahalanobis`` and ``KNN`` with the same hyper-parameters (T = 1 for MSP and Energy; T = 1000 and
ε = 0.0014 for ODIN; k = 50 for KNN). Timed per call:

- ``score``: safetylab's ``detector.score(x)`` against pytorch-ood's ``detector.predict(x)``, the
  forward pass included. pytorch-ood's ``predict`` records autograd graphs unless the caller turns
  them off, so it runs under ``torch.no_grad()`` (its documented use; ODIN, which needs the gradient,
  runs as is). pytorch-ood's feature detectors get the network up to its last layer, ``model[:-1]``, as
  ``encoder``; safetylab's take the input of the last ``nn.Linear`` with a forward hook;
- ``features``: the scores from precomputed logits or penultimate features, without the model:
  ``score_features`` against ``predict_logits`` (MSP, Energy) or ``predict_features`` (Mahalanobis, KNN);
  pytorch-ood's ODIN has no such variant;
- ``fit`` (Mahalanobis, KNN): ``fit`` on the training split, the forward pass included, both sides given
  the same batches of ``FIT_BATCH`` images (safetylab a pair of tensors, which it batches itself;
  pytorch-ood a list of (x, y) batches, which its ``fit`` iterates as it would a loader, so no
  ``DataLoader`` overhead is charged to it), and ``fit_features`` on the precomputed features.

pytorch-ood's KNN runs scikit-learn's ``NearestNeighbors``, which pytorch-ood builds with
``n_jobs=-1``; it is set to 1 (and threadpoolctl holds OpenMP to ``--threads``) so that both sides use
the same cores. Scores are checked to agree after aligning the conventions: pytorch-ood's Mahalanobis
returns half the squared distance under the covariance *sum* of centred outer products (not divided by
N), i.e. safetylab's score / (2N); its ridges differ (1e-6 absolute on that sum against safetylab's 1e-6
relative to the mean variance), hence a looser tolerance; ODIN is compared with safetylab's clipping
to [0, 1] turned off (pytorch-ood does not clip the perturbed input), and its clipped default is
compared by rank correlation. Both libraries say higher = more anomalous.

Timing: rounds; in each, every side of a comparison runs ``--repeats`` samples, the sides in a
rotating order, one sample being the mean of ``number`` back-to-back calls (1 for PGD; for the
detectors, enough calls for about 20 ms). Each side's round time is the median of its samples; a ratio
is the median over rounds of the two sides' round times taken moments apart, so that the shared
machine's slow and fast spells cancel (the ratio of the overall medians is printed next to it).

Peak memory (PGD): each side runs alone in a fresh subprocess (``--mem-repeats`` of them, median);
the growth of the peak RSS over ``--mem-calls`` attack calls, from a baseline taken right before the
first call, after imports, the model, the batch and the attack object are built and after
``malloc_trim`` (``VmHWM`` reset through ``/proc/self/clear_refs``, see ``peak_memory.py``).

Targets: safetylab's PGD ≥ 1.0× torchattacks' speed and ≥ 1.5× ART's; every detector ≥ 1.0×
pytorch-ood's, and Mahalanobis ≥ 5× on the features (its quadratic form against pytorch-ood's loop over
classes; with the forward pass, which both sides share, its ``score`` and ``fit`` are held to 1.0×).

torchattacks, ART and pytorch-ood are benchmark-only dependencies: install
``benchmarks/requirements-robust.txt`` into a separate environment (its header has the recipe) and run
this script with it.

    python benchmarks/robust_vs_peers.py                 # all, 1 thread, 7 rounds, about 2-3 minutes
    python benchmarks/robust_vs_peers.py --only pgd --rounds 9
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path

from peak_memory import peak_kib, reset_peak_rss, status_kib

EPS, STEPS = 0.1, 20
ALPHA = 2.5 * EPS / STEPS
PGD_TOLERANCE = 0.03  # |robust accuracy − the floor's| on the batch
FIT_BATCH = 1024
TARGET_PGD = {"torchattacks": 1.0, "art": 1.5}  # safetylab speed / the peer's
# Mahalanobis: ≥ 5× for the batched quadratic form against pytorch-ood's loop over classes (``features``);
# its ``score`` and ``fit`` share the forward pass, which both sides run, so there the target is 1.0 like all others
TARGET_OOD = {("mahalanobis", "features"): 5.0}
PGD_SIDES = ("safetylab", "safetylab-full", "torchattacks", "art", "floor")
SIDE_NAMES = {"safetylab": "safetylab (early_stop=True)", "safetylab-full": "safetylab (early_stop=False)",
              "torchattacks": "torchattacks", "art": "ART", "floor": "floor (bare PyTorch)"}
DETECTORS = ("msp", "energy", "odin", "mahalanobis", "knn")
SEED = 0


# ----------------------------------------------------------------------------- setup
def build_setup(args, path: Path) -> None:
    """Train the digits CNN, draw the batch, save both (safetensors) for this process and the memory
    subprocesses."""
    import torch
    from safetensors.torch import save_file

    from safetylab.models.classifier import ClassifierTrainConfig, digits_cnn
    from safetylab.models.digits import load_digits
    from safetylab.robust.training import train_classifier

    digits = load_digits(SEED)
    torch.manual_seed(SEED)
    model = digits_cnn(digits.num_classes)
    train_classifier(model, (digits.x_train, digits.y_train), ClassifierTrainConfig(epochs=args.epochs, seed=SEED))
    x_all = torch.cat([digits.x_train, digits.x_val, digits.x_test])
    y_all = torch.cat([digits.y_train, digits.y_val, digits.y_test])
    generator = torch.Generator().manual_seed(SEED)
    if args.batch <= len(x_all):
        index = torch.randperm(len(x_all), generator=generator)[: args.batch]
    else:
        index = torch.randint(len(x_all), (args.batch,), generator=generator)
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    tensors.update(x=x_all[index].contiguous(), y=y_all[index].contiguous(), x_train=digits.x_train,
                   y_train=digits.y_train)
    save_file(tensors, str(path))


def load_setup(path: Path):
    """The model (eval mode), the batch and the training split."""
    from safetensors.torch import load_file

    from safetylab.models.classifier import digits_cnn

    tensors = load_file(str(path))
    model = digits_cnn(int(tensors["model.8.bias"].numel()))
    model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    return model.eval(), tensors["x"], tensors["y"], tensors["x_train"], tensors["y_train"]


def pytorch_ood_detectors():
    """``pytorch_ood.detector`` without the package's ``__init__`` — a benchmark-only shim.

    ``import pytorch_ood`` imports its datasets and model zoo, hence torchvision, whose PyPI wheel does
    not load beside a CPU build of torch (its compiled operators target another torch build). The
    detectors themselves import only torch, numpy, scikit-learn and pytorch-ood's ``api`` and ``utils``.
    So a bare package module pointing at the installed package's folder is registered first, and
    ``import pytorch_ood.detector`` then runs pytorch-ood's own, unchanged detector code: nothing that is
    timed is replaced or patched."""
    if "pytorch_ood" not in sys.modules:
        spec = importlib.util.find_spec("pytorch_ood")
        if spec is None:
            raise SystemExit("pytorch-ood is not installed: see benchmarks/requirements-robust.txt")
        package = types.ModuleType("pytorch_ood")
        package.__path__ = list(spec.submodule_search_locations)
        package.__version__ = importlib.metadata.version("pytorch-ood")
        sys.modules["pytorch_ood"] = package
    import pytorch_ood.detector

    return pytorch_ood.detector


# ----------------------------------------------------------------------------- PGD
def pgd_floor(model, x, y, eps: float, alpha: float, steps: int):
    """Madry et al.'s L∞ PGD with a random start, written plainly: the least work the attack needs."""
    import torch
    import torch.nn.functional as F

    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv


def pgd_sides(model, x, y, sides) -> dict[str, Callable]:
    """One callable per side: attack the batch, return x′ as a tensor. Only the sides' own libraries
    are imported (a memory subprocess sees nothing else)."""
    import torch

    run = {}
    if "safetylab" in sides or "safetylab-full" in sides:
        from safetylab.robust.attacks import pgd

        run["safetylab"] = lambda: pgd(model, x, y, EPS, steps=STEPS)
        run["safetylab-full"] = lambda: pgd(model, x, y, EPS, steps=STEPS, early_stop=False)
    if "torchattacks" in sides:
        import torchattacks

        attack = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=STEPS, random_start=True)
        run["torchattacks"] = lambda: attack(x, y)
    if "art" in sides:
        import numpy as np
        from art.attacks.evasion import ProjectedGradientDescent
        from art.estimators.classification import PyTorchClassifier

        # ART's loss.backward() would also fill the parameters' gradients: a frozen copy spares it that work
        frozen = copy.deepcopy(model).requires_grad_(False)
        classifier = PyTorchClassifier(model=frozen, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                                       nb_classes=int(model[-1].out_features), clip_values=(0.0, 1.0),
                                       device_type="cpu")
        art_attack = ProjectedGradientDescent(classifier, norm=np.inf, eps=EPS, eps_step=ALPHA, max_iter=STEPS,
                                              num_random_init=1, batch_size=len(x), verbose=False)
        x_np, y_np = x.numpy(), y.numpy()
        run["art"] = lambda: torch.from_numpy(art_attack.generate(x_np, y_np))
    if "floor" in sides:
        run["floor"] = lambda: pgd_floor(model, x, y, EPS, ALPHA, STEPS)
    return {s: f for s, f in run.items() if s in sides}


def reseed() -> None:
    import numpy as np
    import torch

    torch.manual_seed(SEED)
    np.random.seed(SEED)


def pgd_checks(model, x, y, run) -> tuple[dict[str, float], list[str]]:
    """Each side's robust accuracy on the batch (same seeds), its distance to the floor's, and whether
    x′ stays in the ball and in [0, 1]."""
    import torch

    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    accuracy, robust, inside = {"clean": clean}, {}, {}
    for side, attack in run.items():
        reseed()
        x_adv = attack()
        with torch.no_grad():
            robust[side] = model(x_adv).argmax(1) == y
        accuracy[side] = robust[side].float().mean().item()
        inside[side] = (x_adv - x).abs().max().item() <= EPS + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1
    lines = []
    for side in run:
        line = f"{SIDE_NAMES[side]:<30} robust accuracy {accuracy[side]:.4f}, x' in the ball and [0, 1]: " + (
            "yes" if inside[side] else "NO")
        if side != "floor":
            delta = accuracy[side] - accuracy["floor"]
            differ = int((robust[side] != robust["floor"]).sum())
            line += (f"; vs the floor |delta| {abs(delta):.4f} (tolerance {PGD_TOLERANCE}: "
                     f"{'agrees' if abs(delta) <= PGD_TOLERANCE else 'DISAGREES'}), {differ} points robust on one "
                     "side only")
        lines.append(line)
    return accuracy, lines


# ----------------------------------------------------------------------------- OOD
def ood_comparisons(model, x, x_train, y_train):
    """The timed pairs ``(detector, operation, safetylab's call, pytorch-ood's call)``, and the lines of
    the score-agreement check (pytorch-ood's scores brought to safetylab's convention first)."""
    import torch

    from safetylab.robust import ood

    theirs = pytorch_ood_detectors()
    encoder = model[:-1]  # up to the input of the last Linear (Dropout is the identity in eval mode)
    with torch.no_grad():
        logits, features = model(x), encoder(x)
        train_features = encoder(x_train)
    train = (x_train, y_train)  # safetylab batches it by FIT_BATCH itself
    fit_batches = [(x_train[i:i + FIT_BATCH], y_train[i:i + FIT_BATCH]) for i in range(0, len(x_train), FIT_BATCH)]

    def no_grad(fn):
        def call(*a):
            with torch.no_grad():
                return fn(*a)
        return call

    ours = {"msp": ood.MSP(model), "energy": ood.Energy(model), "odin": ood.ODIN(model),
            "mahalanobis": ood.Mahalanobis(model, batch_size=FIT_BATCH).fit(train),
            "knn": ood.KNN(model, k=50, batch_size=FIT_BATCH).fit(train)}
    knn = theirs.KNN(encoder, k=50)
    knn.knn.n_jobs = 1
    peer = {"msp": theirs.MaxSoftmax(model), "energy": theirs.EnergyBased(model),
            "odin": theirs.ODIN(model, eps=0.0014, temperature=1000.0),
            "mahalanobis": theirs.Mahalanobis(encoder).fit(fit_batches), "knn": knn.fit(fit_batches)}
    rows = []  # (detector, operation, ours, theirs)
    for name in DETECTORS:
        o, t = ours[name], peer[name]
        rows.append((name, "score", lambda o=o: o.score(x), (lambda t=t: t.predict(x)) if name == "odin"
                     else no_grad(lambda t=t: t.predict(x))))
        if name in ("msp", "energy"):
            rows.append((name, "features", lambda o=o: o.score_features(logits),
                         no_grad(lambda t=t: t.predict_logits(logits))))
        if name in ("mahalanobis", "knn"):
            rows.append((name, "features", lambda o=o: o.score_features(features),
                         no_grad(lambda t=t: t.predict_features(features))))
            rows.append((name, "fit", lambda o=o: o.fit(train), lambda t=t: t.fit(fit_batches)))
            rows.append((name, "fit_features", lambda o=o: o.fit_features(train_features, y_train),
                         lambda t=t: t.fit_features(train_features, y_train)))

    checks = []

    def agree(label, a, b, rtol, atol=0.0):
        a, b = a.double(), b.double().cpu()
        rel = ((a - b).abs() / (b.abs() + atol)).max().item()
        ok = torch.allclose(a, b, rtol=rtol, atol=atol)
        rho = spearman(a, b)
        checks.append(f"{label:<44} max rel diff {rel:.2e} (rtol {rtol:g}: {'agrees' if ok else 'DISAGREES'}), "
                      f"Spearman {rho:.6f}")

    n_train = len(x_train)
    agree("msp: score", ours["msp"].score(x), no_grad(peer["msp"].predict)(x), 1e-4, 1e-7)
    agree("energy: score", ours["energy"].score(x), no_grad(peer["energy"].predict)(x), 1e-4, 1e-7)
    unclipped = ood.ODIN(model, bounds=(-math.inf, math.inf))
    agree("odin: score (safetylab without clipping)", unclipped.score(x), peer["odin"].predict(x), 1e-4, 1e-7)
    rho = spearman(ours["odin"].score(x).double(), peer["odin"].predict(x).double())
    checks.append(f"{'odin: score (safetylab clips to [0, 1])':<44} Spearman {rho:.6f} (definitions differ: clip)")
    agree("mahalanobis: score vs 2N x pytorch-ood's", ours["mahalanobis"].score(x),
          2 * n_train * no_grad(peer["mahalanobis"].predict)(x), 1e-2, 1e-3)
    agree("knn: score", ours["knn"].score(x), no_grad(peer["knn"].predict)(x), 1e-4, 1e-6)
    return rows, checks


def spearman(a, b) -> float:
    """Spearman's rank correlation of two score tensors (tied scores share their mean rank)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a.numpy(), b.numpy()).statistic)


# ----------------------------------------------------------------------------- timing
def calibrate(fn: Callable, seconds: float = 0.02) -> int:
    """Back-to-back calls per sample, so that one sample lasts about ``seconds``."""
    fn()
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    return max(1, math.ceil(seconds / max(once, 1e-6)))


def time_sides(run: dict[str, Callable], rounds: int, repeats: int, number: int = 1,
               label: str = "") -> dict[str, list[float]]:
    """Per side, the median sample time of each round (seconds per call); the sides rotate their
    order from sample to sample."""
    sides = list(run)
    per_round = {s: [] for s in sides}
    for r in range(rounds):
        samples = {s: [] for s in sides}
        for j in range(repeats):
            shift = (r * repeats + j) % len(sides)
            for side in sides[shift:] + sides[:shift]:
                start = time.perf_counter()
                for _ in range(number):
                    run[side]()
                samples[side].append((time.perf_counter() - start) / number)
        for s in sides:
            per_round[s].append(statistics.median(samples[s]))
        if label:
            print(f"  {label} round {r}: " + ", ".join(f"{s} {per_round[s][-1] * 1e3:.1f} ms" for s in sides),
                  flush=True)
    return per_round


def paired_ratio(per_round, a: str, b: str) -> float:
    """Median over rounds of a's round time / b's."""
    return statistics.median(x / y for x, y in zip(per_round[a], per_round[b]))


def ratio_spread(per_round, a: str, b: str) -> str:
    """The quartiles of the per-round ratios a / b: how much of a ratio is noise."""
    ratios = [x / y for x, y in zip(per_round[a], per_round[b])]
    if len(ratios) < 4:
        return "(too few rounds for quartiles)"
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return f"({q1:.2f}-{q3:.2f})"


# ----------------------------------------------------------------------------- memory (subprocess)
def memory_child(args) -> None:
    model, x, y, _, _ = load_setup(Path(args.data))
    run = pgd_sides(model, x, y, {args.child})[args.child]
    reseed()
    source = reset_peak_rss(trim=True)
    before, rss = peak_kib(source), status_kib("VmRSS")
    for _ in range(args.mem_calls):
        run()
    print(json.dumps({"source": source, "rss_before_kib": rss, "growth_kib": peak_kib(source) - before}))


def measure_memory(args, data: Path, side: str) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--data", str(data), "--threads", str(args.threads),
           "--mem-calls", str(args.mem_calls)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main
def limit_threads(threads: int) -> None:
    """torch's intra-op threads, and every BLAS and OpenMP pool (numpy, scikit-learn), to ``threads``."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--only", choices=("pgd", "ood"), action="append", help="run only this part (repeatable)")
    parser.add_argument("--rounds", type=int, default=7, help="timing rounds, sides rotating (default 7)")
    parser.add_argument("--repeats", type=int, default=3, help="samples per side and round (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS/OpenMP threads (default 1)")
    parser.add_argument("--batch", type=int, default=512, help="images in the batch (default 512)")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs of the digits CNN (default 10)")
    parser.add_argument("--mem-calls", type=int, default=2, help="PGD calls in each memory subprocess (default 2)")
    parser.add_argument("--mem-repeats", type=int, default=2, help="memory subprocesses per side (default 2)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()

    missing = [p for p in ("torchattacks", "art", "pytorch_ood") if importlib.util.find_spec(p) is None]
    if missing:
        raise SystemExit(f"{', '.join(missing)} not installed: this benchmark needs the environment of "
                         "benchmarks/requirements-robust.txt (see benchmarks/README.md)")
    warnings.filterwarnings("ignore")
    import torch

    limit_threads(args.threads)
    if args.child:
        memory_child(args)
        return
    parts = args.only or ["pgd", "ood"]
    started = time.perf_counter()
    versions = {p: importlib.metadata.version(p) for p in ("torchattacks", "adversarial-robustness-toolbox",
                                                           "pytorch-ood", "scikit-learn", "numpy")}
    print(f"torch {torch.__version__}, " + ", ".join(f"{k} {v}" for k, v in versions.items())
          + f"; {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, pools {args.threads}")
    with tempfile.TemporaryDirectory(prefix="safetylab-bench-robust-") as tmp:
        data = Path(tmp) / "setup.safetensors"
        build_setup(args, data)
        model, x, y, x_train, y_train = load_setup(data)
        print(f"model: digits CNN, {sum(p.numel() for p in model.parameters()):,} parameters, trained {args.epochs} "
              f"epochs on {len(x_train)} images; batch {len(x)} images {tuple(x.shape[1:])}; "
              f"{args.rounds} rounds x {args.repeats} samples per side")
        pgd_result = ood_result = None
        if "pgd" in parts:
            pgd_result = run_pgd(args, model, x, y)
        if "ood" in parts:
            ood_result = run_ood(args, model, x, x_train, y_train)
        memory = {}
        if "pgd" in parts and not args.no_memory:
            print("\npeak memory: one fresh subprocess per PGD side ...", flush=True)
            for i in range(args.mem_repeats):
                for side in PGD_SIDES if i % 2 == 0 else PGD_SIDES[::-1]:
                    memory.setdefault(side, []).append(measure_memory(args, data, side))
    report(args, pgd_result, ood_result, memory)
    print(f"total wall time {time.perf_counter() - started:.0f} s")


def run_pgd(args, model, x, y) -> dict:
    model = copy.deepcopy(model)
    run = pgd_sides(model, x, y, set(PGD_SIDES))
    print(f"\nPGD: L-inf, eps {EPS}, {STEPS} steps of {ALPHA:g}, random start, untargeted, CE")
    accuracy, lines = pgd_checks(model, x, y, run)
    print(f"  clean accuracy on the batch {accuracy['clean']:.4f}")
    for line in lines:
        print(f"  {line}")
    for fn in run.values():  # warm-up
        fn()
    per_round = time_sides(run, args.rounds, args.repeats, label="pgd")
    return {"rounds": per_round, "accuracy": accuracy}


def run_ood(args, model, x, x_train, y_train) -> dict:
    model = copy.deepcopy(model)
    rows, checks = ood_comparisons(model, x, x_train, y_train)
    print("\nOOD detectors: score agreement with pytorch-ood on the batch (higher = more anomalous on both sides)")
    for line in checks:
        print(f"  {line}")
    results = []
    for name, op, ours, theirs in rows:
        number = calibrate(ours)
        calibrate(theirs)
        per_round = time_sides({"safetylab": ours, "pytorch-ood": theirs}, args.rounds, args.repeats, number)
        results.append((name, op, per_round, number))
        print(f"  {name} {op}: safetylab {statistics.median(per_round['safetylab']) * 1e3:.3f} ms, pytorch-ood "
              f"{statistics.median(per_round['pytorch-ood']) * 1e3:.3f} ms ({number} calls per sample)", flush=True)
    return {"rows": results}


def report(args, pgd_result, ood_result, memory) -> None:
    if pgd_result is not None:
        rounds = pgd_result["rounds"]
        print()
        print(f"PGD on {args.batch} images, median ms per call. Speed ratios: the other side's time / safetylab's "
              "(> 1: safetylab is faster), median of the per-round ratios (their quartiles) [ratio of the medians]")
        print(f"{'side':<30} {'ms/call':>8} {'/ floor':>8}  {'robust acc':>10}")
        for side in PGD_SIDES:
            print(f"{SIDE_NAMES[side]:<30} {statistics.median(rounds[side]) * 1e3:>8.1f} "
                  f"{paired_ratio(rounds, side, 'floor'):>8.3f}  {pgd_result['accuracy'][side]:>10.4f}")
        print("  (early_stop=True returns, per point, the first x′ that fools the model and stops attacking it: the "
              "same robust accuracy, but not the highest-loss x′, which transfer and confidence metrics want; "
              "early_stop=False does the peers' work, every point every step)")
        for ours in ("safetylab", "safetylab-full"):
            for peer in ("torchattacks", "art", "floor"):
                speed = paired_ratio(rounds, peer, ours)
                raw = statistics.median(rounds[peer]) / statistics.median(rounds[ours])
                target = TARGET_PGD.get(peer)
                verdict = "" if target is None else (f"  (target >= {target}: "
                                                     f"{'meets' if speed >= target else 'MISSES'})")
                print(f"  {SIDE_NAMES[ours]} vs {SIDE_NAMES[peer]}: {speed:.3f}x {ratio_spread(rounds, peer, ours)} "
                      f"[{raw:.3f}x]{verdict}")
    if memory:
        print()
        print(f"PGD peak RSS growth over {args.mem_calls} calls, fresh subprocess per side, median of "
              f"{args.mem_repeats} (peak from {next(iter(memory.values()))[0]['source']}):")
        print(f"{'side':<30} {'MiB':>7} {'baseline RSS MiB':>17}  runs MiB")
        growth = {}
        for side in PGD_SIDES:
            runs = memory[side]
            growth[side] = statistics.median(m["growth_kib"] for m in runs) / 1024
            base = statistics.median(m["rss_before_kib"] for m in runs) / 1024
            each = " ".join(f"{m['growth_kib'] / 1024:.1f}" for m in runs)
            print(f"{SIDE_NAMES[side]:<30} {growth[side]:>7.1f} {base:>17.0f}  {each}")
        for ours in ("safetylab", "safetylab-full"):
            parts = [f"/ {SIDE_NAMES[s]} {growth[ours] / max(growth[s], 1e-3):.3f}"
                     for s in ("torchattacks", "art", "floor")]
            print(f"  peak memory ratio (RSS growth), {SIDE_NAMES[ours]} " + ", ".join(parts))
    if ood_result is not None:
        print()
        print("OOD detectors on the batch (fit: on the training split), median ms per call. Speed ratio: "
              "pytorch-ood's time / safetylab's, median of the per-round ratios (quartiles) [ratio of the medians]")
        print(f"{'detector':<12} {'operation':<13} {'safetylab ms':>12} {'pytorch-ood ms':>15} {'speed ratio':>24}  "
              "target")
        for name, op, rounds, _ in ood_result["rows"]:
            ours, theirs = statistics.median(rounds["safetylab"]), statistics.median(rounds["pytorch-ood"])
            speed = paired_ratio(rounds, "pytorch-ood", "safetylab")
            target = TARGET_OOD.get((name, op), 1.0)
            cell = f"{speed:.2f} {ratio_spread(rounds, 'pytorch-ood', 'safetylab')} [{theirs / ours:.2f}]"
            print(f"{name:<12} {op:<13} {ours * 1e3:>12.3f} {theirs * 1e3:>15.3f} {cell:>24}  >= {target}: "
                  f"{'meets' if speed >= target else 'MISSES'}")

if __name__ == "__main__":
    main()
