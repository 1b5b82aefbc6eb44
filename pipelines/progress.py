"""Readable job logs: one call, `setup()`, first thing in every jobs/*.py entry point.

A submitted job's output is a log file, not a terminal. There, Ray's coloured worker prefixes, Ray Data's
progress bars and any carriage-return redraws become pages of escape sequences. When stdout is not a TTY,
`setup()`:
- turns Ray Data's progress bars off and registers `StageProgress`, which prints our own concise lines: one
  line when a stage (Ray Data operator) finishes, with its rows and time, and at most one heartbeat line per
  `CLIP_PROGRESS_EVERY_S` seconds (default 30) for the running dataset;
- asks Ray not to colour the `(pid=...)` prefixes of worker lines (RAY_COLOR_PREFIX=0);
- wraps stdout and stderr (and the logging handlers writing to them) so that whatever still carries escape
  sequences or lone carriage returns (a library's coloured log line) reaches the log as plain text.
In a terminal it changes nothing. `job_env()` is the colour and progress-bar part as environment variables,
which jobs/submit.py gives every job (its worker processes read them too, and so does an entry point that
does not call `setup()`). The stage lines are printed by the job's driver, for the datasets it runs.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import time
from typing import TextIO

# CSI (colours, cursor moves), OSC (titles, links) and two-byte escapes.
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
HEARTBEAT_ENV = "CLIP_PROGRESS_EVERY_S"
CALLBACKS_ENV = "RAY_DATA_EXECUTION_CALLBACKS"
STAGE_PROGRESS = f"{__name__}.StageProgress"


def plain(text: str) -> str:
    """`text` without terminal escape sequences; a carriage return that redraws a line becomes a newline."""
    text = ANSI.sub("", text)
    return text.replace("\r\n", "\n").replace("\r", "\n")


def job_env() -> dict[str, str]:
    """Environment for a job whose output goes to a log: no colours, no Ray Data or tqdm bars."""
    return {"RAY_COLOR_PREFIX": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}


class PlainStream(io.TextIOBase):
    """A text stream that writes `plain(text)` to the stream it wraps."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(plain(text))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", "utf-8")


def _wrap_std_streams() -> None:
    originals = {}
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if not isinstance(stream, PlainStream):
            originals[id(stream)] = PlainStream(stream)
            setattr(sys, name, originals[id(stream)])
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for lg in loggers:
        for handler in lg.handlers:
            stream = getattr(handler, "stream", None)
            if isinstance(handler, logging.StreamHandler) and id(stream) in originals:
                handler.setStream(originals[id(stream)])


def setup(interactive: bool | None = None) -> bool:
    """Plain, concise job output when stdout is not a terminal; returns whether it changed anything."""
    if interactive is None:
        interactive = sys.stdout.isatty()
    if interactive:
        return False
    os.environ.update(job_env())
    _wrap_std_streams()
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    # Registered by name in this process's environment, not in the DataContext: the context is pickled into
    # every task, and a worker would then have to import this module to read its own arguments.
    callbacks = [c for c in os.environ.get(CALLBACKS_ENV, "").split(",") if c]
    if STAGE_PROGRESS not in callbacks:
        os.environ[CALLBACKS_ENV] = ",".join([*callbacks, STAGE_PROGRESS])
    # "Progress bars disabled. To enable, ..." is about the bars we turned off on purpose.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    return True


def _count(n: int) -> str:
    return f"{n:,}"


class StageLog:
    """The same `[stage]` lines for a stage of our own that is not a Ray Data operator (the crawl's plan,
    shard workers, dedupe): `beat(text)` at most once per `CLIP_PROGRESS_EVERY_S`, `done(text)` once."""

    def __init__(self, name: str):
        self.name = name
        self.start = self.last_beat = time.monotonic()
        self.every = float(os.environ.get(HEARTBEAT_ENV, "30"))

    def beat(self, text: str) -> None:
        now = time.monotonic()
        if now - self.last_beat >= self.every:
            self.last_beat = now
            print(f"[stage] {now - self.start:.0f} s: {self.name} {text}", flush=True)

    def done(self, text: str) -> None:
        print(f"[stage] {self.name}: done, {text}, {time.monotonic() - self.start:.1f} s", flush=True)


try:
    from ray.data._internal.execution.execution_callback import ExecutionCallback
except ImportError:  # pragma: no cover (an older Ray: no callbacks, bars stay off)
    ExecutionCallback = object  # type: ignore[assignment,misc]


class StageProgress(ExecutionCallback):
    """Ray Data execution callback: one line per finished stage, a one-line heartbeat while it runs."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.last_beat = self.start
        self.every = float(os.environ.get(HEARTBEAT_ENV, "30"))
        self.done: set[str] = set()

    @staticmethod
    def _stages(executor) -> list[tuple[str, int, bool]]:
        """(name, rows handed downstream, finished) per operator, inputs excluded, in pipeline order."""
        stages = []
        for op in getattr(executor, "_topology", None) or {}:
            if type(op).__name__ == "InputDataBuffer":
                continue
            metrics = getattr(op, "metrics", None)
            rows = int(getattr(metrics, "row_outputs_taken", 0) or 0)
            stages.append((op.name, rows, bool(op.has_completed())))
        return stages

    def _report_finished(self, executor) -> None:
        elapsed = time.monotonic() - self.start
        for name, rows, finished in self._stages(executor):
            if finished and name not in self.done:
                self.done.add(name)
                print(f"[stage] {name}: done, {_count(rows)} rows out, {elapsed:.1f} s", flush=True)

    def on_execution_step(self, executor) -> None:
        self._report_finished(executor)
        now = time.monotonic()
        if now - self.last_beat >= self.every:
            self.last_beat = now
            running = " | ".join(f"{n} {_count(r)}" for n, r, f in self._stages(executor) if not f)
            if running:
                print(f"[stage] {now - self.start:.0f} s: {running} rows so far", flush=True)

    def after_execution_succeeds(self, executor) -> None:
        self._report_finished(executor)

    def after_execution_fails(self, executor, error: Exception) -> None:
        print(
            f"[stage] failed after {time.monotonic() - self.start:.1f} s: {type(error).__name__}", flush=True
        )
