"""Where the output of a run's Ray workers goes: into ``logs/ray.log`` under the run, not onto the console.

Ray echoes every actor's stdout/stderr on the driver's terminal: Ray Train prints one ``Reporting training
result ...`` line (a dict of metrics) per step, its controller narrates worker-group start-up, and with the
dashboard off its PlacementGroupCleaner prints a traceback each time it cannot query actor state. None of it is
ours to act on, and it buries the progress bar. Actor failures still reach the driver as exceptions (which it
says in one line), and the raylet's and autoscaler's notices (a worker killed for memory, a request that cannot be
scheduled) stay on the console, except those that carry an actor's traceback, which go to the log.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable

__all__ = ["send_worker_output_to"]

RAY_CONSOLE_HANDLER = "ray_print_logs"  # the name Ray registers its console printer under (ray._private.worker)
OWN_HANDLER = "euphonium_run_log"
KEEP_ON_CONSOLE = ("raylet", "autoscaler")
TRACEBACK_START = "Traceback (most recent call last)"


def send_worker_output_to(path: str | Path) -> Callable[[], None]:
    """From now on, write Ray's worker and actor lines to ``path`` (appending) instead of the console; returns
    the function that puts Ray's console printer back. Does nothing when Ray is not echoing worker output
    (``log_to_driver=False``) or its dispatcher has moved (another Ray version)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return lambda: None
    console = [handler for name, handler in list(dispatcher.handlers) if name == RAY_CONSOLE_HANDLER]
    if not console:
        return lambda: None
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    sink = open(target, "a", buffering=1, encoding="utf-8")
    lock = threading.Lock()

    def route(data: dict[str, Any]) -> None:
        if data.get("pid") in KEEP_ON_CONSOLE and not _carries_traceback(data):
            for handler in console:
                handler(data)
            return
        who = data.get("actor_name") or data.get("task_name") or "worker"
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        stream = "stderr" if data.get("is_err") else "stdout"
        with lock:
            if not sink.closed:
                sink.writelines(f"{stamp} ({who} pid={data.get('pid')} {stream}) {line}\n"
                                for line in data.get("lines", []))

    dispatcher.remove_handler(RAY_CONSOLE_HANDLER)
    dispatcher.add_handler(OWN_HANDLER, route)
    unhook_errors = _send_error_tracebacks_to(route)

    def restore() -> None:
        unhook_errors()
        dispatcher.remove_handler(OWN_HANDLER)
        if not any(name == RAY_CONSOLE_HANDLER for name, _ in dispatcher.handlers) and _still_connected():
            for handler in console:
                dispatcher.add_handler(RAY_CONSOLE_HANDLER, handler)
        with lock:
            sink.close()

    return restore


def _send_error_tracebacks_to(route: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
    """The raylet's error notices reach the console another way than worker output: the driver's error listener
    thread prints them with ``ray._private.worker.print_to_stdstream``. Those that carry a traceback are routed like
    worker output; the rest print as before. Returns the function that undoes it."""
    try:
        import ray._private.worker as ray_worker
    except ImportError:
        return lambda: None
    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None:
        return lambda: None

    def print_to_stdstream(data: dict[str, Any], ignore_prefix: bool) -> None:
        if _carries_traceback(data):
            route(data)
        else:
            original(data, ignore_prefix)

    ray_worker.print_to_stdstream = print_to_stdstream

    def undo() -> None:
        if ray_worker.print_to_stdstream is print_to_stdstream:
            ray_worker.print_to_stdstream = original

    return undo


def _carries_traceback(data: dict[str, Any]) -> bool:
    """A raylet notice with an actor's Python traceback in it ("Task X.ready failed. There are 2 retries remaining
    ... Error: Traceback ..."): the driver reports that failure itself in one line, so the traceback goes to the
    log with the rest."""
    return any(TRACEBACK_START in line for line in data.get("lines", []))


def _still_connected() -> bool:
    """After ``ray.shutdown()`` Ray has dropped its printer itself; putting it back would print into nothing."""
    import ray

    return ray.is_initialized()
