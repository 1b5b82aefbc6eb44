"""pipelines/progress.py: plain job output (no escape sequences) and one line per finished Ray Data stage."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from pipelines.progress import PlainStream, StageProgress, job_env, plain, setup

ROOT = Path(__file__).resolve().parents[1]


def test_plain_strips_colours_cursor_moves_titles_and_redraws():
    coloured = "\x1b[36m(pid=1)\x1b[0m hi \x1b[1;32mok\x1b[39m\x1b[2K\x1b[1A\x1b]0;title\x07 end"
    assert plain(coloured) == "(pid=1) hi ok end"
    assert plain("10%\r50%\r100%\n") == "10%\n50%\n100%\n"
    assert plain("a\r\nb") == "a\nb"
    out = io.StringIO()
    stream = PlainStream(out)
    stream.write("\x1b[31mred\x1b[0m\n")
    assert out.getvalue() == "red\n" and not stream.isatty()


def test_setup_in_a_terminal_changes_nothing():
    stdout = sys.stdout
    assert setup(interactive=True) is False
    assert sys.stdout is stdout


class FakeOp:
    """An operator as the callback sees it: name, metrics.row_outputs_taken, has_completed()."""

    def __init__(self, name: str, rows: int, done: bool):
        self.name, self.metrics, self.done = name, SimpleNamespace(row_outputs_taken=rows), done

    def has_completed(self) -> bool:
        return self.done


def fake_executor(ops):
    """Shaped like Ray Data's StreamingExecutor for the callback: `_topology` keyed by operator."""
    return SimpleNamespace(_topology={FakeOp(*op): None for op in ops})


def test_stage_progress_prints_one_line_per_finished_stage(capsys, monkeypatch):
    monkeypatch.setenv("CLIP_PROGRESS_EVERY_S", "0")
    cb = StageProgress()
    cb.on_execution_step(fake_executor([("ReadParquet", 1200, True), ("MapBatches(filter)", 300, False)]))
    cb.on_execution_step(fake_executor([("ReadParquet", 1200, True), ("MapBatches(filter)", 800, True)]))
    cb.after_execution_succeeds(
        fake_executor([("ReadParquet", 1200, True), ("MapBatches(filter)", 800, True)])
    )
    lines = capsys.readouterr().out.splitlines()
    finished = [line for line in lines if ": done," in line]
    assert [line.split(":")[0] for line in finished] == ["[stage] ReadParquet", "[stage] MapBatches(filter)"]
    assert "1,200 rows out" in finished[0] and "800 rows out" in finished[1]
    heartbeat = [line for line in lines if "rows so far" in line]
    assert heartbeat and "MapBatches(filter) 300" in heartbeat[0]


def test_a_piped_job_prints_plain_stage_lines():
    """A real Ray Data pipeline in a fresh process whose stdout is a pipe: stage lines, no escape sequence,
    while a worker prints in colour (its line is forwarded with a plain prefix and stripped)."""
    code = (
        "import ray; from pipelines.progress import setup; assert setup();"
        "ray.init(num_cpus=1, include_dashboard=False);"
        "print(ray.data.range(100, override_num_blocks=2).map_batches(lambda b: b).count());"
        "f = ray.remote(lambda: print('\\x1b[31mred\\x1b[0m'));"
        "ray.get(f.remote()); import time; time.sleep(1)"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "\x1b" not in out and "\r" not in out
    assert "[stage] ReadRange->MapBatches(<lambda>)->Project: done, 100 rows out" in out
    assert "red" in out


def test_job_env_turns_colours_and_bars_off():
    assert job_env() == {"RAY_COLOR_PREFIX": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
