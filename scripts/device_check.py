"""Input checks, sound bounds and dropout-free preference training on an accelerator (the tests run on CPU).

    python scripts/device_check.py cuda        # or mps, or cpu; exits 1 if a check fails

Trains a digits CNN for 3 epochs on the device and checks that attacks and detectors run there and refuse
inputs on another device or in another dtype; that IBP, CROWN and α-CROWN do not verify a false float64
LeakyReLU property and exact verification falsifies it; that a float64 region on a float32 network is
bounded in float64; that a network with a submodule in training mode is refused; and that DPO's first step
is at ln 2 for a policy equal to its reference though the model was built with dropout 0.1.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time

import torch
from torch import nn

from safetylab.core import RunDir, SafetylabError

device = torch.device(sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu"))
print("device", device, torch.__version__, torch.cuda.get_device_name() if device.type == "cuda" else "")
results = []


def check(name, ok, detail=""):
    results.append(ok)
    print(("PASS " if ok else "FAIL ") + name, detail, flush=True)


def raises(fn, fragment):
    try:
        fn()
    except SafetylabError as e:
        return fragment in str(e), str(e)[:160]
    return False, "no error"


# --------------------------------------------------------------------- robust
from safetylab.models.classifier import ClassifierTrainConfig, digits_cnn  # noqa: E402
from safetylab.models.digits import load_digits  # noqa: E402
from safetylab.robust import MSP, Mahalanobis, evaluate_robustness, pgd  # noqa: E402
from safetylab.robust.training import train_classifier  # noqa: E402

digits = load_digits(0)
torch.manual_seed(0)
model = digits_cnn(digits.num_classes).to(device)
t = time.perf_counter()
train_classifier(model, (digits.x_train.to(device), digits.y_train.to(device)), ClassifierTrainConfig(epochs=3))
print(f"train 3 epochs {time.perf_counter() - t:.2f}s")
model.eval()
x, y = digits.x_test[:256].to(device), digits.y_test[:256].to(device)
x_adv = pgd(model, x, y, eps=0.1, steps=10)
check("pgd on the device", x_adv.device == x.device and (x_adv - x).abs().max().item() <= 0.1 + 1e-6)
if device.type != "cpu":
    check("pgd refuses inputs on another device", *raises(lambda: pgd(model, x.cpu(), y.cpu(), eps=0.1), "move x"))
check("pgd refuses float64 inputs", *raises(lambda: pgd(model, x.double(), y, eps=0.1), "float64"))
scores = MSP(model).score(x)
check("MSP scores on CPU", scores.device.type == "cpu" and scores.shape == (256,))
maha = Mahalanobis(model).fit((digits.x_train.to(device), digits.y_train.to(device)))
check("Mahalanobis fit and score", torch.isfinite(maha.score(x)).all().item())
result = evaluate_robustness(model, (x, y), eps=0.1, steps=10, square_queries=50)
check("evaluate_robustness", 0 <= result.robust_accuracy <= result.clean_accuracy <= 1,
      f"clean {result.clean_accuracy:.3f} robust {result.robust_accuracy:.3f}")

# --------------------------------------------------------------------- verify
from safetylab.verify import box, compute_bounds, linf_ball, margin_spec, verify_exact  # noqa: E402

net = nn.Sequential(nn.Linear(1, 1), nn.LeakyReLU(0.1), nn.Linear(1, 1)).double().to(device)
with torch.no_grad():
    net[0].weight.fill_(1.0), net[0].bias.fill_(-2.0), net[2].weight.fill_(-1.0), net[2].bias.fill_(-0.1 - 1e-10)
net.eval()
unit = torch.ones(1, 1, dtype=torch.float64, device=device)
region, spec = box(0 * unit, unit), unit[None]
for method in ("ibp", "crown", "alpha-crown"):
    verified = compute_bounds(net, region, spec, method).verified().item()
    check(f"{method} does not verify the false LeakyReLU property", not verified)
exact = verify_exact(net.cpu(), box(torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)),
                     torch.ones(1, 1, 1, dtype=torch.float64))
check("verify_exact falsifies it", exact[0].status == "falsified", str(exact[0].status))
mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)).to(device).eval()
xs, ys = digits.x_test[:16].to(device), digits.y_test[:16].to(device)
wide = compute_bounds(mlp, linf_ball(xs.double(), 0.01), margin_spec(ys, 8).double(), "crown")
ref = compute_bounds(mlp.double(), linf_ball(xs.double(), 0.01), margin_spec(ys, 8).double(), "crown")
check("float64 region on a float32 net is bounded in float64", wide.lower.dtype == torch.float64
      and torch.allclose(wide.lower, ref.lower, atol=1e-10), f"{(wide.lower - ref.lower).abs().max().item():.2e}")
mlp = mlp.float()
mlp[1].train()
check("a submodule in training mode is refused", *raises(
    lambda: compute_bounds(mlp, linf_ball(xs, 0.01), margin_spec(ys, 8), "crown"), "training mode"))

# --------------------------------------------------------------------- align
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from safetylab.align.data import preferences_from_records  # noqa: E402
from safetylab.align.dpo import DPOConfig, train_dpo  # noqa: E402
from safetylab.models import train_tokenizer  # noqa: E402
from safetylab.models.train import TrainConfig  # noqa: E402
from safetylab.world import World  # noqa: E402

world = World()
tok = train_tokenizer(world.corpus(300, fact_repeats=1))
rows = preferences_from_records(world.preferences(32, "ideal")).rows


def dropout_lm():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=2, n_head=2, n_embd=64, n_positions=128,
                                      resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).to(device)


train = TrainConfig(steps=1, batch_size=16, lr=1e-30, warmup_steps=0, max_length=64, log_every=1,
                    checkpoint_every=1, device=device.type)
with tempfile.TemporaryDirectory() as d:
    train_dpo(dropout_lm(), tok, rows, DPOConfig(train=train), RunDir(d, {}), dropout_lm().eval())
    first = RunDir(d, {}).metrics()[0]
check("DPO step 1 at ln 2 with dropout 0.1 in the model", abs(first["loss"] - math.log(2)) < 1e-5
      and first["rewards/margins"] == 0.0, f"loss {first['loss']} margin {first['rewards/margins']}")
print(f"{sum(results)}/{len(results)} passed")
sys.exit(0 if all(results) else 1)
