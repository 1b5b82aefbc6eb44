"""pipelines/progress.py: plain job output (no escape sequences) and one line per finished Ray Data stage.
Real job logs are checked by tests/test_job_submission.py and tests/test_cluster_e2e.py."""

from __future__ import annotations

import io
import sys
from types import SimpleNamespace

from pipelines.progress import PlainStream, StageProgress, job_env, plain, setup


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


def test_job_env_turns_colours_and_bars_off():
    assert job_env() == {"RAY_COLOR_PREFIX": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
