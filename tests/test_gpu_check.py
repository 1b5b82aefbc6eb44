"""benchmarks/gpu_check.py's CPU fallback (gloo, tiny model, 2 processes), run as users run the check (one
command): the same code path the CUDA run takes (DDP, all-gathered loss, fp16/bf16 settings, save +
resume), so the GPU check is known to run."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_cpu_fallback_trains_and_resumes():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu", "--steps", "3"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["world"] == 2 and summary["model"] == "tiny-vit"
    for precision in ("fp16", "bf16"):
        assert summary[precision]["loss_last"] < summary[precision]["loss_first"]
        assert summary[precision]["samples_per_s"] > 0


def test_gpu_check_verdicts():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    with pytest.raises(AssertionError, match="loss did not fall"):
        gpu_check.verify({"bf16": {"losses": [2.0, 2.0], "resumed": [2.0]}}, 1e-4)
    with pytest.raises(AssertionError, match="resume differs"):
        gpu_check.verify({"bf16": {"losses": [3.0, 2.5, 2.0, 1.5], "resumed": [2.0, 1.0]}}, 1e-4)
    assert gpu_check.peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and gpu_check.peak_flops("cpu") is None
