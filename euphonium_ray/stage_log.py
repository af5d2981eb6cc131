"""A stage-by-stage log for scripts that run on a machine we only see through what they leave behind.

Each line carries the wall time and the seconds since the start and is flushed and fsynced at once, so a process
killed in the middle (a hang past its command's time limit) still leaves every line up to the stage it hung in.
A watchdog (``watch``) writes every thread's stack into the same file when no stage has finished for a while,
and stops the process at a hard deadline. Standard library only: the Ray smoke test runs it before anything
else is known to import.
"""

from __future__ import annotations

import faulthandler
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["StageLog"]


class StageLog:
    """``log("text")`` writes one line; ``with log.stage("name"):`` brackets a stage and records its seconds."""

    def __init__(self, path: str | Path, echo: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", buffering=1)
        self.echo = echo
        self.t0 = time.monotonic()
        self.last = self.t0
        self.stages: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def __call__(self, message: str) -> None:
        line = f"{time.strftime('%F %T')} +{time.monotonic() - self.t0:8.2f}s {message}"
        with self._lock:
            if self.echo:
                print(line, flush=True)
            self.file.write(line + "\n")
            self.file.flush()
            os.fsync(self.file.fileno())
            self.last = time.monotonic()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self(f"stage {name}: start")
        t = time.monotonic()
        try:
            yield
        except BaseException as exc:
            self(f"stage {name}: FAILED after {time.monotonic() - t:.2f}s: {type(exc).__name__}: {exc}")
            raise
        self.stages[name] = time.monotonic() - t
        self(f"stage {name}: done in {self.stages[name]:.2f}s")

    def watch(self, stall_s: float, deadline_s: float, on_stall: Callable[[], None] | None = None) -> None:
        """In the background: after ``stall_s`` without a log line, log every thread's stack (and call
        ``on_stall``, e.g. to log what Ray holds) once per stall; at ``deadline_s`` dump the stacks and exit."""
        faulthandler.dump_traceback_later(deadline_s, exit=True, file=self.file)

        def loop() -> None:
            reported = 0.0
            while not self._stop.wait(min(5.0, stall_s)):
                quiet = time.monotonic() - self.last
                if quiet >= stall_s and self.last != reported:
                    self(f"watchdog: no progress for {quiet:.0f}s; stacks follow")
                    with self._lock:
                        faulthandler.dump_traceback(file=self.file, all_threads=True)
                        self.file.flush()
                    if on_stall is not None:
                        try:
                            on_stall()
                        except Exception as exc:  # noqa: BLE001 - a diagnostic must not end the run
                            self(f"watchdog: diagnostics failed: {type(exc).__name__}: {exc}")
                    reported = self.last

        threading.Thread(target=loop, name="stage-log-watchdog", daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        faulthandler.cancel_dump_traceback_later()
        self.file.close()
