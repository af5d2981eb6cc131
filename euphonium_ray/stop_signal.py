"""SIGTERM / SIGINT to a training driver: stop at a step boundary, not in the middle of one.

The first signal lets the running step finish (its learner update, broadcast, log lines and, when due, its
checkpoint), then the driver stops with ``Interrupted`` and shuts down what it started; logs and checkpoints agree,
and ``--resume latest`` continues from the newest checkpoint. A second signal abandons the step at once. The exit
status is the shell's convention, 128 + the signal number (143 for SIGTERM, 130 for SIGINT)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Callable

from euphonium_ray.errors import EuphoniumError

__all__ = ["Interrupted", "StopSignal"]

_HANDLED = (signal.SIGTERM, signal.SIGINT)


class Interrupted(EuphoniumError):
    """The run stopped because it was asked to (a signal); ``exit_status`` is 128 + the signal number."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class StopSignal:
    """Catches SIGTERM and SIGINT while installed (main thread only; elsewhere it stays inert)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in _HANDLED}
        return self

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # the second one: abandon the step
            raise Interrupted(signum, f"stopped by a second {signal.Signals(signum).name} in the middle of a step; "
                                      "the newest checkpoint is what --resume latest continues from")
        self.signum = signum

    def check(self, step: int, newest_checkpoint: Callable[[], Path | None]) -> None:
        """After step ``step``: stop here if a signal came during it (the checkpoint folder is read only then)."""
        if self.signum is None:
            return
        newest = newest_checkpoint()
        where = (f"--resume latest continues from {newest}" if newest is not None
                 else "no checkpoint was written yet: a new run starts from step 0")
        raise Interrupted(self.signum, f"stopped by {self.name} after step {step}; {where}")
