"""Training under ``accelerate launch`` with 2 CPU processes (gloo) matches one process on the same
global batch: the loss normaliser makes DDP's averaged gradients equal the single-process ones."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("distributed_train.py")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("accelerate") is None and not Path(sys.executable).with_name("accelerate").exists(),
                    reason="accelerate launcher not installed")
def test_two_processes_match_one(tmp_path):
    launcher = Path(sys.executable).with_name("accelerate")
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, str(SCRIPT), str(one)], check=True, capture_output=True)
    result = subprocess.run(
        [str(launcher), "launch", "--num_processes", "2", "--cpu", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", str(SCRIPT), str(two)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [[json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two)]
    assert len(losses[0]) == len(losses[1]) == 4
    assert losses[0] == pytest.approx(losses[1], abs=1e-4)
    weights = [load_file(str(d / "artifacts" / "model" / "model.safetensors")) for d in (one, two)]
    for name, tensor in weights[0].items():
        torch.testing.assert_close(tensor, weights[1][name], atol=1e-4, rtol=1e-4)
