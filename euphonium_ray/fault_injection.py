"""Fault injection: kill the run's processes at seeded moments and check that nothing changed.

``run_fault_injection`` trains a toy config three ways into one folder each:

1. undisturbed, in this process (``driver.train``);
2. disturbed: a driver subprocess (``python -m euphonium_ray.fault_injection drive``) in which a ``FaultInjector``
   SIGKILLs, by process id, a rollout worker, a PRM scorer, an ORM scorer or a learner rank (Ray Train's worker) at
   each moment of a seeded ``Schedule``; after the last of those this process SIGKILLs the driver itself, mid-step;
3. ``euphonium-ray train --config <its config> --resume latest`` finishes the disturbed run.

A moment is (role, step, phase, fraction): ``fraction`` of the way through ``phase`` (rollout, reward, learn) of
``step``, timed from the undisturbed run's phase seconds. The report holds the schedule, what each kill hit (the
process id, the seconds into the step), whether the final weights and optimizer state equal the undisturbed run's
bit for bit, and whether the step log holds every step exactly once.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from euphonium_ray.config import RunConfig, load_config

__all__ = ["FaultInjector", "Kill", "Schedule", "compare_runs", "make_schedule", "run_fault_injection"]

ROLES = ("rollout", "prm", "orm", "learner")
PHASES = ("rollout", "reward", "learn")  # in the order a sync step runs them (advantage, broadcast: milliseconds)
PID_WAIT_S = 300.0


@dataclass(frozen=True)
class Kill:
    """SIGKILL ``role``'s process ``delay_s`` seconds after step ``step`` starts (``fraction`` into ``phase``)."""

    role: str
    step: int
    phase: str
    fraction: float
    delay_s: float


@dataclass(frozen=True)
class Schedule:
    seed: int
    kills: tuple[Kill, ...]
    driver_step: int  # the driver is killed during this step (after every role kill) ...
    driver_delay_s: float  # ... this many seconds after the step before it was logged

    def to_json(self) -> str:
        return json.dumps({"seed": self.seed, "kills": [asdict(k) for k in self.kills],
                           "driver_step": self.driver_step, "driver_delay_s": self.driver_delay_s})

    @classmethod
    def from_json(cls, text: str) -> "Schedule":
        data = json.loads(text)
        return cls(int(data["seed"]), tuple(Kill(**k) for k in data["kills"]), int(data["driver_step"]),
                   float(data["driver_delay_s"]))


def _offset(timings: dict[str, float], phase: str, fraction: float) -> float:
    """Seconds from a step's start to ``fraction`` of the way through ``phase``."""
    before = sum(float(timings.get(p, 0.0)) for p in PHASES[: PHASES.index(phase)])
    if phase == "learn":
        before += float(timings.get("advantage", 0.0))
    return before + fraction * float(timings.get(phase, 0.0))


def make_schedule(seed: int, step_timings: list[dict[str, float]], *, kills: int = 10, kill_steps: int,
                  roles: tuple[str, ...] = ROLES) -> Schedule:
    """``kills`` moments over steps ``0..kill_steps-1``, each (role, step) at most once and every role at least once
    (so a short schedule still hits each), then the driver during step ``kill_steps``. ``step_timings``: the
    undisturbed run's ``timings`` per step (seconds of rollout, reward, advantage, learn)."""
    rng = random.Random(seed)
    slots = [(r, s) for r in roles for s in range(kill_steps)]
    if kills > len(slots):
        raise ValueError(f"{kills} kills do not fit {len(roles)} roles x {kill_steps} steps once each")
    first = [(r, rng.randrange(kill_steps)) for r in roles]
    rest = rng.sample([s for s in slots if s not in first], kills - len(first))
    chosen = sorted(first + rest, key=lambda rs: (rs[1], ROLES.index(rs[0])))
    out = []
    for role, step in chosen:
        phase, fraction = rng.choice(PHASES), round(rng.uniform(0.1, 0.9), 3)
        out.append(Kill(role, step, phase, fraction, round(_offset(step_timings[step], phase, fraction), 3)))
    driver_fraction = rng.uniform(0.1, 0.9)
    driver_delay = round(driver_fraction * float(step_timings[kill_steps]["step"]), 3)
    return Schedule(seed, tuple(out), kill_steps, driver_delay)


# ------------------------------------------------------------------------------------------ the injector
class FaultInjector:
    """A ``train(on_event=...)`` hook: at the start of each scheduled step, looks up the process ids of the roles
    to kill (while they are idle), then SIGKILLs each at its delay on a thread. Appends one JSON line per kill to
    ``log``: the kill, the process id and the seconds into the step it landed."""

    def __init__(self, schedule: Schedule, log: Path) -> None:
        self.schedule, self.log = schedule, log
        self.killed: set[int] = set()
        self.threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def _pid(self, system: Any, role: str) -> int:
        """The process id of ``role``'s first actor (the learner: rank 0), waiting for one not killed yet (a restart
        in progress)."""
        import ray

        deadline = time.monotonic() + PID_WAIT_S
        while True:
            if role == "learner":
                pid = system.learner.pids().get(0)
            else:
                actor = {"rollout": system.rollout_workers, "prm": system.roles.prm, "orm": system.roles.orm}[role][0]
                pid = int(ray.get(actor.ready.remote())["pid"])
            if pid is not None and pid not in self.killed:
                return int(pid)
            if time.monotonic() > deadline:
                raise TimeoutError(f"no live {role} process within {PID_WAIT_S:.0f}s")
            time.sleep(0.2)

    def __call__(self, event: str, step: int, system: Any, record: dict[str, Any] | None) -> None:
        if event != "step_start":
            return
        due = [k for k in self.schedule.kills if k.step == step]
        if not due:
            return
        t0 = time.monotonic()
        for kill in due:
            pid = self._pid(system, kill.role)
            with self._lock:
                self.killed.add(pid)
            thread = threading.Thread(target=self._kill, args=(kill, pid, t0), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _kill(self, kill: Kill, pid: int, t0: float) -> None:
        time.sleep(max(0.0, t0 + kill.delay_s - time.monotonic()))
        at = time.monotonic() - t0
        try:
            os.kill(pid, signal.SIGKILL)
            hit = True
        except ProcessLookupError:
            hit = False
        with self._lock, open(self.log, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({**asdict(kill), "pid": pid, "at_s": round(at, 3), "hit": hit}) + "\n")


def drive(config: str, schedule_file: str, log: str, address: str) -> None:
    """The disturbed driver, on the Ray at ``address``: ``train`` with a ``FaultInjector`` (no evaluation: the
    weights are what is compared)."""
    from euphonium_ray.driver import train

    schedule = Schedule.from_json(Path(schedule_file).read_text())
    train(load_config(config, use_env=False), progress=False, evaluate=False, address=address,
          on_event=FaultInjector(schedule, Path(log)))


# ----------------------------------------------------------------------------------------- comparison
def _tensors(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    out = {f"weights/{k}": v for k, v in
           load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors")).items()}
    if (folder / "optimizer.safetensors").is_file():
        out.update({f"optimizer/{k}": v for k, v in load_file(str(folder / "optimizer.safetensors")).items()})
    return out


def compare_runs(reference: Path, run: Path, steps: int) -> dict[str, Any]:
    """The final checkpoints' tensors (weights and optimizer state) compared with ``torch.equal``, and the step
    log's steps in order."""
    import torch

    ref, got = _tensors(reference / "checkpoints" / f"step-{steps}"), _tensors(run / "checkpoints" / f"step-{steps}")
    differ = sorted(k for k in ref if k not in got or not torch.equal(ref[k], got[k]))
    logged = [json.loads(line)["step"] for line in (run / "logs" / "steps.jsonl").read_text().splitlines() if line]
    return {"tensors": len(ref), "same_names": ref.keys() == got.keys(), "differ": differ,
            "bit_identical": ref.keys() == got.keys() and not differ, "logged_steps": logged,
            "every_step_once": logged == list(range(steps))}


# ------------------------------------------------------------------------------------------- harness
def _wait_for_idle_cluster(timeout_s: float) -> None:
    """Until the killed driver's job has lost its actors and placement groups (Ray frees them when it sees the
    driver gone): every CPU of the cluster is free again."""
    import ray

    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0.0) < ray.cluster_resources().get("CPU", 0.0):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the killed driver's actors still hold CPUs after {timeout_s:.0f}s")
        time.sleep(0.2)


def _lines(path: Path) -> int:
    return path.read_text().count("\n") if path.is_file() else 0


def run_fault_injection(cfg: RunConfig, root: Path, *, seed: int = 0, kills: int = 10, kill_steps: int = 4,
                        log: Callable[[str], None] = print, timeout_s: float = 900.0) -> dict[str, Any]:
    """The undisturbed run, the schedule drawn from its timings, the disturbed run (role kills, then the driver's),
    its ``--resume latest`` and their comparison, all on one Ray (this process's, else a private local one started
    here): the drivers are subprocesses joined to it, so a killed driver takes its job's actors with it, not the
    cluster. ``cfg.steps`` must exceed ``kill_steps`` (the driver dies during step ``kill_steps``);
    ``output.save_every`` > 1 makes a restarted learner replay kept steps. Returns a report (``bit_identical``,
    ``every_step_once``, the schedule, the kills, seconds per part)."""
    import ray

    from euphonium_ray.driver import connect

    started = connect(cfg, None)
    try:
        return _run(cfg, root, ray.get_runtime_context().gcs_address, seed=seed, kills=kills, kill_steps=kill_steps,
                    log=log, timeout_s=timeout_s)
    finally:
        if started:
            ray.shutdown()


def _run(cfg: RunConfig, root: Path, address: str, *, seed: int, kills: int, kill_steps: int,
         log: Callable[[str], None], timeout_s: float) -> dict[str, Any]:
    from euphonium_ray.driver import train

    if cfg.steps <= kill_steps:
        raise ValueError(f"steps={cfg.steps} leaves no step after the {kill_steps} with role kills for the driver's")
    cfg = cfg.model_copy(deep=True)
    cfg.cluster.max_actor_restarts = max(cfg.cluster.max_actor_restarts, kill_steps)
    cfg.cluster.max_learner_restarts = max(cfg.cluster.max_learner_restarts, kill_steps)
    times: dict[str, float] = {}

    t0 = time.perf_counter()
    undisturbed = root / "undisturbed"
    reference = train(cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": str(undisturbed)})}),
                      progress=False, evaluate=False)
    times["undisturbed_s"] = time.perf_counter() - t0
    timings = [{k.removeprefix("time/"): v for k, v in h["scalars"].items() if k.startswith("time/")}
               for h in reference["history"]]
    schedule = make_schedule(seed, timings, kills=kills, kill_steps=kill_steps)
    log(f"schedule (seed {seed}): " + "; ".join(f"{k.role} at step {k.step}, {k.phase} {k.fraction:.2f} "
                                                   f"(+{k.delay_s:.2f}s)" for k in schedule.kills)
        + f"; the driver during step {schedule.driver_step} (+{schedule.driver_delay_s:.2f}s)")

    run = root / "disturbed"
    run.mkdir(parents=True, exist_ok=True)
    config, schedule_file, kills_log = root / "disturbed.yaml", root / "schedule.json", root / "kills.jsonl"
    cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": str(run)})}).save(config)
    schedule_file.write_text(schedule.to_json())
    kills_log.write_text("")
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    t1 = time.perf_counter()
    driver_log = root / "disturbed-driver.log"  # a file, not a pipe: a full pipe would stall the driver
    with open(driver_log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen([sys.executable, "-m", "euphonium_ray.fault_injection", "drive", str(config),
                                 str(schedule_file), str(kills_log), address], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    steps_log = run / "logs" / "steps.jsonl"
    deadline = time.monotonic() + timeout_s
    # the driver dies during step `driver_step`: once the step before it is logged, after every role kill
    while _lines(steps_log) < schedule.driver_step or _lines(kills_log) < len(schedule.kills):
        if proc.poll() is not None:
            raise RuntimeError(f"the disturbed driver ended early ({proc.returncode}):\n"
                               f"{driver_log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"the disturbed run did not reach step {schedule.driver_step} in {timeout_s:.0f}s")
        time.sleep(0.05)
    time.sleep(schedule.driver_delay_s)
    done_before_kill = _lines(steps_log)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    _wait_for_idle_cluster(120.0)
    times["disturbed_s"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    resumed = subprocess.run([sys.executable, "-m", "euphonium_ray.cli", "train", "--config", str(config),
                              "--resume", "latest", "--address", address, "--no-progress", "--no-env"], env=env, capture_output=True,
                             text=True, timeout=timeout_s)
    times["resume_s"] = time.perf_counter() - t2
    if resumed.returncode != 0:
        raise RuntimeError(f"--resume latest failed ({resumed.returncode}):\n{resumed.stderr[-4000:]}")
    report = compare_runs(undisturbed, run, cfg.steps)
    hits = [json.loads(line) for line in kills_log.read_text().splitlines() if line]
    train_log = (run / "logs" / "train.log").read_text()
    return {**report, "schedule": json.loads(schedule.to_json()), "kills": hits,
            "steps_logged_before_driver_kill": done_before_kill, "driver_output_tail": driver_log.read_text()[-2000:],
            "learner_restart_lines": [ln for ln in train_log.splitlines() if "Ray Train restarted it" in ln],
            "resumed_from": [ln for ln in train_log.splitlines() if "resuming from" in ln],
            "seconds": {k: round(v, 1) for k, v in times.items()}}


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "drive":
        drive(*sys.argv[2:6])
    else:
        sys.exit("usage: python -m euphonium_ray.fault_injection drive CONFIG SCHEDULE KILLS_LOG RAY_ADDRESS")
