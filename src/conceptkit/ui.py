"""Rendering: chatter, progress and tables go to stderr; `--json` documents go to stdout."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from conceptkit.capacity import human_size  # noqa: F401  re-exported for the commands
from conceptkit.jsondata import finite_json


def _console() -> Console:
    """stderr; off a terminal (a log file, CI, a pipe) wide enough that tables are not cut to 80 columns."""
    console = Console(stderr=True, highlight=False)
    if not console.is_terminal:
        console = Console(stderr=True, highlight=False, width=max(int(os.environ.get("COLUMNS", 0) or 0), 200))
    return console


err = _console()


def info(message: str) -> None:
    """One line of chatter, as is: no markup read from it (paths and names may hold brackets), no wrapping."""
    err.print(message, markup=False, soft_wrap=True)


def error(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", markup=True, soft_wrap=True)


def print_json(data: Any) -> None:
    """One JSON document on stdout, nothing else there (strict JSON: no NaN)."""
    sys.stdout.write(json.dumps(finite_json(data), indent=2, default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


def human_age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, overflow="fold")  # wrap long keys and paths, never cut them
    for r in rows:
        t.add_row(*[str(v) for v in r])
    err.print(t)


class _Rate(TextColumn):
    """Items per second since the task started."""

    def __init__(self, unit: str):
        super().__init__("")
        self.unit = unit

    def render(self, task):  # noqa: D401 - rich API
        from rich.text import Text

        elapsed = task.elapsed or 0.0
        done = task.completed - task.fields.get("first", 0)
        rate = done / elapsed if elapsed > 0 and done > 0 else 0.0
        return Text(f"{rate:.2f} {self.unit}/s")


@contextmanager
def progress(description: str, unit: str = "it", enabled: bool = True) -> Iterator:
    """A progress bar on stderr; yields `update(done, total, **fields)`."""
    if not enabled:
        yield lambda done, total, **fields: None
        return
    if not err.is_terminal:
        with _progress_lines(description, unit) as update:
            yield update
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _Rate(unit),
        TextColumn("{task.fields[extra]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )
    task = None

    def update(done: int, total: int, **fields) -> None:
        nonlocal task
        extra = _fields_text(fields)
        if task is None:
            task = bar.add_task(description, total=total, completed=done, first=done, extra=extra)
        else:
            bar.update(task, total=total, completed=done, extra=extra)

    with bar:
        yield update


@contextmanager
def stage_progress(units: dict[str, str], enabled: bool = True) -> Iterator:
    """One bar per stage, opened when the stage first reports and closed when the next one does;
    yields `update(stage, done, total)` for a library call that runs several stages."""
    with ExitStack() as stack:
        current: dict[str, Any] = {"stage": None, "update": None}

        def update(stage: str, done: int, total: int) -> None:
            if stage != current["stage"]:
                stack.close()
                current["stage"] = stage
                current["update"] = stack.enter_context(progress(stage, unit=units.get(stage.split()[0], "it"), enabled=enabled))
            current["update"](done, total)

        yield update


def _fields_text(fields: dict) -> str:
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())


@contextmanager
def _progress_lines(description: str, unit: str, every_s: float = 5.0) -> Iterator:
    """Off a terminal: one plain progress line every few seconds (and at the end), not one bar at the end."""
    start = time.perf_counter()
    state = {"first": None, "last": -math.inf, "line": None}

    def line(done: int, total: int, fields: dict) -> str:
        elapsed = time.perf_counter() - start
        new = done - state["first"]
        rate = new / elapsed if elapsed > 0 else 0.0
        eta = f"  eta {human_age((total - done) / rate)}" if 0 < rate and done < total else ""
        extra = f"  {_fields_text(fields)}" if fields else ""
        return f"{description} {done}/{total}  {rate:.2f} {unit}/s  elapsed {human_age(elapsed)}{eta}{extra}"

    def update(done: int, total: int, **fields) -> None:
        if state["first"] is None:
            state["first"] = done
        state["line"] = line(done, total, fields)
        now = time.perf_counter()
        if now - state["last"] >= every_s or done >= total:
            err.print(state["line"], markup=False)
            state["last"] = now if done < total else math.inf  # the final line once

    yield update
    if state["line"] is not None and state["last"] != math.inf:
        err.print(state["line"], markup=False)


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start
