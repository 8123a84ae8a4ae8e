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

LAUNCHER = Path(sys.executable).with_name("accelerate")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("accelerate") is None and not LAUNCHER.exists(), reason="no accelerate launcher")
@pytest.mark.parametrize(("script", "logs"), [("distributed_train.py", 4), ("distributed_dpo.py", 3)])
def test_two_processes_match_one(tmp_path, script, logs):
    """Same global batch, one process or two: losses and final weights agree to 1e-4 (the reduction
    order of gloo's all-reduce differs from one process's sum, so bit equality is not expected)."""
    script = str(Path(__file__).with_name(script))
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, script, str(one)], check=True, capture_output=True)
    result = subprocess.run(
        [str(LAUNCHER), "launch", "--num_processes", "2", "--cpu", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", script, str(two)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two)]
    assert len(records[0]) == len(records[1]) == logs
    for a, b in zip(*records):
        assert a.keys() == b.keys()
        assert [a[k] for k in a] == pytest.approx([b[k] for k in a], abs=1e-4)
    weights = [load_file(str(d / "artifacts" / "model" / "model.safetensors")) for d in (one, two)]
    for name, tensor in weights[0].items():
        torch.testing.assert_close(tensor, weights[1][name], atol=1e-4, rtol=1e-4)
