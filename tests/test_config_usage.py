"""Configuration errors are usage errors: one line naming the dotted key, exit 2, no traceback."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipelines.build_wit import BuildWITConfig
from pipelines.config import ConfigError, load_config, parse_args

ROOT = Path(__file__).resolve().parents[1]

BAD = {
    "crawl.samples_per_shard=0": "crawl.samples_per_shard must be >= 1",
    "crawl.image.resize_mode=squash": "crawl.image.resize_mode must be one of",
    "crawl.fetch.allowed_networks=[10.0.0.0/33]": "crawl.fetch.allowed_networks: '10.0.0.0/33' is not a network",
    "crawl.fetch.allowed_networks=[not-a-network]": "crawl.fetch.allowed_networks: 'not-a-network'",
    "crawl.fetch.budget=global": "crawl.fetch.budget must be auto, local or cluster",
}


@pytest.mark.parametrize("override", list(BAD))
def test_bad_values_name_their_dotted_key(override, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(BuildWITConfig, [override])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert BAD[override] in err[-1] and "Traceback" not in "".join(err)


@dataclass
class Inner:
    low: int = 0
    high: int = 1

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise ValueError("low must not exceed high")
        if self.low < 0:
            raise ValueError("negative bounds are not supported")


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)


def test_the_first_field_named_in_the_message_is_the_key():
    with pytest.raises(ConfigError, match=r"^inner\.low must not exceed high$"):
        load_config(Outer, None, ["inner.low=5"])
    with pytest.raises(ConfigError, match=r"^inner: negative bounds are not supported$"):
        load_config(Outer, None, ["inner.low=-1"])


def test_the_job_exits_2_with_one_line(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "jobs/build_wit.py"), "crawl.image.resize_mode=squash", f"output={tmp_path}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert (
        out.stderr.strip().splitlines()[-1].startswith("build_wit.py: error: crawl.image.resize_mode must be")
    )
