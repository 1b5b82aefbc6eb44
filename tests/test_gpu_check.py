"""benchmarks/gpu_check.py's CPU fallback (gloo, tiny model, 2 processes): the same code path the CUDA run
takes (DDP, all-gathered loss, fp16/bf16 settings, save + resume), so the GPU check is known to run."""

import importlib.util
from pathlib import Path

import pytest


def test_gpu_check_cpu_fallback_trains_and_resumes(capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    summary = gpu_check.main(["--cpu", "--steps", "3"])
    assert summary["world"] == 2 and summary["model"] == "tiny-vit"
    for precision in ("fp16", "bf16"):
        assert summary[precision]["loss_last"] < summary[precision]["loss_first"]
        assert summary[precision]["samples_per_s"] > 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("{")
    with pytest.raises(AssertionError, match="loss did not fall"):
        gpu_check.verify({"bf16": {"losses": [2.0, 2.0], "resumed": [2.0]}}, 1e-4)
    assert gpu_check.peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and gpu_check.peak_flops("cpu") is None
