"""An actor's failure during a run, said in one line on the console, with the whole traceback in the run's log.

An exception raised inside a Ray actor reaches the driver wrapped: ``RayTaskError`` around the actor's own error
(its ``cause``), ``ActorDiedError`` around a failed constructor (``base_exception``), Ray Train's
``WorkerGroupError`` around each rank's (``worker_failures``), and our clients' ``RuntimeError`` around those
(``__cause__``). Printed as is, that is one to three hundred lines of traceback with the one that matters inside.
``actor_failure_line`` unwraps to the root error, appends the full traceback to the log file and returns
``"<where> failed: <Type>: <first line of its message> (traceback: <log file>)"``.
"""

from __future__ import annotations

import re
import time
import traceback
from pathlib import Path

__all__ = ["actor_failure_line", "is_actor_failure", "root_error"]

MAX_UNWRAP = 20


def _wrapped(exc: BaseException) -> BaseException | None:
    """The exception ``exc`` wraps, if it is one of the wrappers above."""
    failures = getattr(exc, "worker_failures", None)  # ray.train.WorkerGroupError: rank -> exception
    if isinstance(failures, dict) and failures:
        return failures[min(failures)]
    for attr in ("controller_failure", "cause", "base_exception"):  # Ray Train controller, RayTaskError, actor init
        inner = getattr(exc, attr, None)
        if isinstance(inner, BaseException) and inner is not exc:
            return inner
    return exc.__cause__


def _chain(exc: BaseException) -> list[BaseException]:
    out = [exc]
    while len(out) < MAX_UNWRAP:
        inner = _wrapped(out[-1])
        if inner is None or any(inner is seen for seen in out):
            break
        out.append(inner)
    return out


def is_actor_failure(exc: BaseException) -> bool:
    """Whether ``exc`` came out of a Ray actor, task or Ray Train worker (anywhere in its wrapping)."""
    import ray.exceptions
    from ray.train import TrainingFailedError

    return any(isinstance(e, (ray.exceptions.RayError, TrainingFailedError)) for e in _chain(exc))


def root_error(exc: BaseException) -> BaseException:
    """The innermost error of the wrapping (the actor's own exception)."""
    return _chain(exc)[-1]


def _where(exc: BaseException) -> str:
    """Which actor method failed (``ORMScorer.score_latents``), from the outermost Ray error; the learner when Ray
    Train or the learner's mailbox reports it."""
    import ray.exceptions
    from ray.train import TrainingFailedError

    learner = "the learner (Ray Train)"
    for e in _chain(exc):
        if isinstance(e, TrainingFailedError):
            return learner
        if isinstance(e, ray.exceptions.RayTaskError):
            # the error Ray raises is a copy typed as the cause too, without function_name; its text starts with
            # the worker's process title, "ray::ORMScorer.score_latents()"
            named = getattr(e, "function_name", None) or next(iter(re.findall(r"ray::([\w.]+)\(", str(e))), None)
            if named:
                method = ".".join(named.split(".")[-2:])
                return learner if method.startswith("LearnerHub.") else method
        if isinstance(e, ray.exceptions.RayActorError):
            return "a Ray actor"
    return learner


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and lines[0].startswith("Traceback"):  # a Ray error holding a traceback as text: its last line
        return lines[-1]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def actor_failure_line(exc: BaseException, log_file: str | Path) -> str | None:
    """The one line to print for an actor's failure (None when ``exc`` is not one: the caller re-raises it),
    after appending its full traceback to ``log_file``."""
    if not is_actor_failure(exc):
        return None
    root = root_error(exc)
    log = Path(log_file)
    line = f"{_where(exc)} failed: {_first_line(root)}"
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} ERROR {line}\n")
            fh.write("".join(traceback.format_exception(exc)))
        return f"{line} (traceback: {log})"
    except OSError:  # the log cannot be written: the console line is all there is
        return line
