"""benchmarks/gpu_check.py's CPU fallback (gloo, tiny model, 2 processes), run as users run the check (one
command): the same code path the CUDA run takes (DDP, all-gathered loss, fp16/bf16 settings, save +
resume), so the GPU check is known to run."""

import importlib.util
import json
import os
import subprocess
import sys
import time
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
    gpu_check = _load()
    with pytest.raises(AssertionError, match="loss did not fall"):
        gpu_check.verify({"bf16": {"losses": [2.0, 2.0], "resumed": [2.0]}}, 1e-4)
    with pytest.raises(AssertionError, match="resume differs"):
        gpu_check.verify({"bf16": {"losses": [3.0, 2.5, 2.0, 1.5], "resumed": [2.0, 1.0]}}, 1e-4)
    assert gpu_check.peak_flops("cpu") is None and gpu_check.peak_flops("NVIDIA B9000") is None


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
        ("NVIDIA GH200 480GB", 989e12), ("NVIDIA H20", 148e12), ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A10G", 70e12), ("NVIDIA A10", 125e12), ("NVIDIA L4", 121e12), ("NVIDIA L40S", 362e12),
        ("NVIDIA L40", 181e12), ("Tesla V100-SXM2-16GB", 125e12), ("Tesla T4", 65e12),
        ("NVIDIA RTX A6000", 155e12),
    ],
)  # fmt: skip
def test_gpu_peak_flops_by_device_name(name, peak):
    assert _load().peak_flops(name) == peak  # the most specific name fragment wins


def test_bf16_is_checked_only_where_the_gpu_runs_it():
    gpu_check = _load()
    assert gpu_check.precisions((9, 0)) == gpu_check.precisions((8, 0)) == ["fp16", "bf16"]
    assert gpu_check.precisions((7, 0)) == gpu_check.precisions((7, 5)) == ["fp16"]  # V100, T4
    assert gpu_check.precisions(None) == ["fp16", "bf16"]  # CPU fallback: fp32 and bf16 autocast


def test_a_failing_rank_ends_the_check_at_once(tmp_path):
    """Rank 1 dies before training; rank 0 would wait for it in a collective: the check must fail now, with
    the rank named, and leave no process behind (it runs under a timeout well below gloo's 5 minutes)."""
    env = {**os.environ, "CLIP_TEST_FAULTS": "gpu_check:1", "CLIP_TEST_FAULTS_DIR": str(tmp_path)}
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--steps", "1"], capture_output=True,
                          text=True, timeout=120, env=env)  # fmt: skip
    assert done.returncode == 1 and "rank 1 exited with code 1" in done.stderr, done.stderr[-3000:]
    assert "injected fault at gpu_check:1" in done.stderr and time.monotonic() - started < 120


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_the_gpu_check_refuses_instead_of_passing_on_cpu():
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no CUDA device visible" in done.stderr and "--cpu" in done.stderr


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
