"""What the CLI shows and how it stops: SIGINT/SIGTERM handling (nothing written), progress bars
or log lines, the console's log format and the one-line messages."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from onnx_lowrank.errors import OutputPathError

log = logging.getLogger("onnx_lowrank")
stdout = Console()
stderr = Console(stderr=True)



class Interrupted(BaseException):
    """SIGINT or SIGTERM: like KeyboardInterrupt, not caught by ``except Exception``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


class Signals:
    """SIGINT and SIGTERM interrupt the run until its outputs are committed; from the commit on they
    are recorded and ignored, so exit 0 always means written and 130/143 means nothing written."""

    HANDLED = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> "Signals":
        self.pending: list[int] = []
        self.previous = {signum: signal.signal(signum, self._interrupt) for signum in self.HANDLED}
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    @staticmethod
    def _interrupt(signum, frame) -> None:
        raise Interrupted(signum)

    def commit(self, staging) -> None:
        for signum in self.HANDLED:
            signal.signal(signum, lambda received, frame: self.pending.append(received))
        if self.pending:
            raise Interrupted(self.pending[0])
        staging.commit()


class BarProgress:
    """Progress bars on a terminal."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def stage(self, description: str, total: int) -> Callable[[int], None]:
        task = self.progress.add_task(description, total=total)
        return lambda advance=1: self.progress.advance(task, advance)


class LogProgress:
    """Progress as log lines, for pipelines: a line when a stage starts, every ~30 s, and when it ends."""

    INTERVAL_S = 30.0

    def stage(self, description: str, total: int) -> Callable[[int], None]:
        state = {"done": 0, "last": time.monotonic(), "start": time.monotonic()}
        log.info("%s: 0/%d", description, total)

        def advance(step: int = 1) -> None:
            state["done"] += step
            now = time.monotonic()
            if state["done"] >= total:
                log.info("%s: %d/%d done in %.1f s", description, state["done"], total, now - state["start"])
            elif now - state["last"] >= self.INTERVAL_S:
                state["last"] = now
                log.info("%s: %d/%d", description, state["done"], total)
        return advance


class ConsoleFormatter(logging.Formatter):
    """``warning: …`` / ``error: …``; info lines timestamped when stderr is not a terminal."""

    def __init__(self, timestamps: bool) -> None:
        super().__init__("%(asctime)s %(message)s" if timestamps else "%(message)s", "%Y-%m-%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {record.getMessage()}"
        return super().format(record)


def configure_logging(quiet: bool, verbose: bool, log_file: Optional[Path]) -> None:
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.DEBUG)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.ERROR if quiet else logging.DEBUG if verbose else logging.INFO)
    console.setFormatter(ConsoleFormatter(timestamps=not stderr.is_terminal))
    log.addHandler(console)
    if log_file is not None:
        try:  # the log is written as the run goes, so its folder is made now, as a staged output's is
            log_file.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(log_file, mode="a", encoding="utf-8")
        except OSError as exc:
            raise OutputPathError(f"cannot append to --log-file {log_file}: {exc.strerror or exc}") from None
        handler.setLevel(logging.DEBUG)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)


def tell(line: str) -> None:
    """The run's last word: one line on stderr, and in the --log-file when there is one."""
    stderr.print(line, markup=False, highlight=False, soft_wrap=True)
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, line, None, None))


def one_line(text: str) -> str:
    """Names and paths may hold line breaks; an error stays one line."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def print_quietly_on_broken_pipe(print_report: Callable[[], None]) -> None:
    try:
        print_report()
    except BrokenPipeError:
        # Point stdout at /dev/null so that the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


@contextmanager
def progress_sink(quiet: bool):
    from onnx_lowrank.measure.context import NullProgress

    if quiet:
        yield NullProgress()
    elif not stderr.is_terminal:
        yield LogProgress()
    else:
        with Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=stderr, transient=True) as bars:
            yield BarProgress(bars)
