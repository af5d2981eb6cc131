"""``euphonium-ray train``: the single controller of a Euphonium run on Ray.

Checks the inputs before touching the cluster (model folder, prompt embeddings, PRM, resources), connects to Ray
(embedded local Ray unless ``--address``/``cluster.address``/``RAY_ADDRESS``), places the roles, then runs the
loop, one step at a time: prompts → rollouts → rewards → advantages → learn → broadcast. In ``async`` mode the
rollouts of step k+1 run while the learner learns step k (they use weights one version old; the importance
ratio corrects that). Outputs land under ``output.dir`` (see ``run_logging.py`` and ``checkpoint.py``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable


from euphonium_ray.actor_failure import actor_failure_line
from euphonium_ray.config import RunConfig, load_config
from euphonium_ray.errors import EuphoniumError, RunError
from euphonium_ray.ray_output import send_worker_output_to
from euphonium_ray.stop_signal import Interrupted
from euphonium_ray.step import advantages, learning_batch

__all__ = ["RunError", "main", "prepare_inputs", "resolve_paths", "train"]

EventHook = Callable[[str, int, Any, dict[str, Any] | None], None]


# ------------------------------------------------------------------------------------------------ inputs
def resolve_paths(cfg: RunConfig, base: Path | None = None) -> RunConfig:
    """Absolute paths everywhere, so actors (whose working directory differs) see the same files."""
    base = base or Path.cwd()
    cfg = cfg.model_copy(deep=True)

    def absolute(p: str) -> str:
        return str((base / p).resolve()) if p and not Path(p).is_absolute() else p

    cfg.model.path = absolute(cfg.model.path)
    if cfg.model.checkpoint:
        cfg.model.checkpoint = absolute(cfg.model.checkpoint)
    cfg.data.prompts = absolute(cfg.data.prompts)
    if cfg.data.eval_prompts:
        cfg.data.eval_prompts = absolute(cfg.data.eval_prompts)
    cfg.rewards.prm.path = absolute(cfg.rewards.prm.path)
    cfg.output.dir = absolute(cfg.output.dir)
    return cfg


def _check_model_folder(cfg: RunConfig, log: Callable[[str], None]) -> None:
    root = Path(cfg.model.path)
    if cfg.model.family == "toy" and (not root.exists() or (cfg.data.prompts and not Path(cfg.data.prompts).is_file())):
        from euphonium_ray.toy.build import build_toy_model

        why = "does not exist yet" if not root.exists() else f"has no {Path(cfg.data.prompts).name}"
        log(f"toy model folder {root} {why}: building it (euphonium-ray toy build)")
        build_toy_model(root, cfg, log=log)
    if not cfg.model.path or not root.is_dir():
        raise RunError(f"model folder not found: {root} (model.path)")
    for needed in (root / "transformer" / "config.json", root / "vae" / "config.json"):
        if not needed.is_file():
            raise RunError(f"model folder {root} is incomplete: missing {needed.relative_to(root)}")


def _check_prompts(cfg: RunConfig, pooled_dim: int, index: str | None = None):
    from euphonium_ray.data import DataError, PromptEmbeddingDataset

    if not cfg.data.prompts:
        raise RunError("data.prompts is not set (a videos2caption.json of prompt embeddings)")
    try:
        dataset = PromptEmbeddingDataset(index or cfg.data.prompts, pooled_dim=pooled_dim)
        for i, entry in enumerate(dataset.entries):
            for key in ("prompt_embed_path", "prompt_attention_mask"):
                path = dataset._resolve(entry[key])
                if not path.is_file():
                    raise RunError(f"{dataset.json_path}: entry {i} points at a missing file {path} ({key})")
        dataset[0]  # one full read: shapes and dtypes
    except DataError as exc:
        raise RunError(str(exc)) from None
    return dataset


def _check_prm(cfg: RunConfig) -> None:
    from euphonium_ray.actors.placement import needs_prm_pool

    if not (cfg.rgg.enabled or needs_prm_pool(cfg)) or cfg.rewards.prm.kind != "latent":
        return
    path = Path(cfg.rewards.prm.path) if cfg.rewards.prm.path else None
    if path is None or not (path / "config.json").is_file():
        raise RunError(
            f"the latent PRM folder {path} (rewards.prm.path) has no config.json; train one with "
            "`euphonium-ray train-prm`, or set rgg.enabled=false and rewards.latent_outcome=false"
        )


def prepare_inputs(cfg: RunConfig, log: Callable[[str], None] = print) -> tuple[Any, Any, int, tuple[int, ...]]:
    """Check every input; returns (training prompts, evaluation prompts, pooled width, latent shape), the
    evaluation prompts being ``data.eval_prompts`` when set, else the training prompts. Raises RunError."""
    from euphonium_ray.data import pooled_dim_of
    from euphonium_ray.models.codecs import load_codec

    _check_model_folder(cfg, log)
    pooled = pooled_dim_of(cfg.model.path)
    dataset = _check_prompts(cfg, pooled)
    eval_set = _check_prompts(cfg, pooled, cfg.data.eval_prompts) if cfg.data.eval_prompts else dataset
    _check_prm(cfg)
    if cfg.data.prompts_per_step % cfg.cluster.num_learners:
        raise RunError(f"data.prompts_per_step={cfg.data.prompts_per_step} groups cannot be split evenly over "
                       f"cluster.num_learners={cfg.cluster.num_learners}")
    codec = load_codec(Path(cfg.model.path) / "vae")
    shape = tuple(int(s) for s in codec.latent_shape(cfg.data.num_frames, cfg.data.height, cfg.data.width))
    return dataset, eval_set, pooled, shape


# --------------------------------------------------------------------------------------------------- ray
def connect(cfg: RunConfig, address: str | None) -> bool:
    """Join the given cluster, or start a private local one. Returns True when this call started Ray.

    Without an address, ``ray.init()`` would attach to a ``ray start --head`` of this machine, or try a stale
    record of one in Ray's temp folder; ``address="local"`` always starts a new instance, bound to 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return False
    target = address or cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if target:
        ray.init(address=target, log_to_driver=True)
        return False
    # Ray's workers (role actors, Ray Train's learner) inherit this environment: give them the folders of the run's
    # plugin modules, which they import to validate the config and build the components it names.
    _export_plugin_dirs(cfg)
    # bound to loopback rather than to whatever address Ray guesses (on a machine without a network its guess falls
    # back to hostname resolution, which may name no usable interface)
    ray.init(address="local", num_cpus=cfg.cluster.num_cpus, object_store_memory=cfg.cluster.object_store_memory,
             _node_ip_address=LOOPBACK, dashboard_host=LOOPBACK, logging_level=logging.WARNING)
    return True


LOOPBACK = "127.0.0.1"


def private_ray_note() -> str:
    """What the private local Ray exposes, said once at start (ray.init sets RAY_AUTH_MODE when it was unset)."""
    auth = os.environ.get("RAY_AUTH_MODE", "").lower()
    guard = ("token authentication on" if auth == "token" else
             f"token authentication off (RAY_AUTH_MODE={auth or 'unset'}): any process on this machine can reach it")
    try:  # Ray's own start-up line, which said where the dashboard is, is silenced with the rest of its INFO
        from ray._private.worker import get_dashboard_url

        dashboard = f"; dashboard http://{get_dashboard_url()}" if get_dashboard_url() else ""
    except Exception:  # noqa: BLE001 (a Ray without it: the note simply leaves the dashboard out)
        dashboard = ""
    return f"started a private local Ray on {LOOPBACK} only; {guard}{dashboard}"


def _export_plugin_dirs(cfg: RunConfig) -> None:
    """Prepend the plugin modules' folders to ``PYTHONPATH`` (a plugin imported from the working directory or a
    ``sys.path`` entry of this process would otherwise be missing in Ray's worker processes)."""
    from euphonium_ray.registry import plugin_dirs

    current = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    extra = [d for d in plugin_dirs(cfg.plugins) if d not in current]
    if extra:
        os.environ["PYTHONPATH"] = os.pathsep.join(extra + current)


# -------------------------------------------------------------------------------------------------- loop
class BatchFeed:
    """A step's scored rollouts, from ``collect(step, version)``: made when asked (``sync``: with the weights of
    the step itself), or with ``ahead`` made one step early on a thread while the learner learns the step before
    (``async``: weights one version old; the importance ratio corrects that)."""

    def __init__(self, collect: Callable[[int, int], Any], *, ahead: bool, end: int) -> None:
        self.collect, self.ahead, self.end = collect, ahead, end
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="rollouts-ahead") if ahead else None
        self.pending: tuple[int, Future[Any]] | None = None

    def take(self, step: int) -> Any:
        if self.pending is not None and self.pending[0] == step:
            batch, self.pending = self.pending[1].result(), None
            return batch
        return self.collect(step, step)

    def prefetch(self, step: int) -> None:
        if self.pool is not None and step < self.end:
            self.pending = (step, self.pool.submit(self.collect, step, step - 1))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


class StepLog:
    """What the driver does around the algorithm's calls: the step's clock and hooks, the records (metrics,
    TensorBoard, JSONL), sample videos and the periodic ODE evaluation."""

    def __init__(self, cfg: RunConfig, system: Any, recorder: Any, hook: EventHook,
                 evaluate_orm: Callable[[int], Any]) -> None:
        self.cfg, self.system, self.recorder, self.hook, self.evaluate_orm = cfg, system, recorder, hook, evaluate_orm
        self.t_step = 0.0
        self.timings: dict[str, float] = {}

    def before(self, start: int) -> Any:
        before = self.evaluate_orm(start)
        self.recorder.eval(start - 1, float(before.nanmean()), record=False)
        self.recorder.logger.info(f"ORM reward of unguided ODE samples before step {start}: "
                                  f"{float(before.nanmean()):.4f}")
        return before

    def begin(self, step: int) -> None:
        self.t_step, self.timings = time.perf_counter(), {}
        self.system.timings.clear()
        self.hook("step_start", step, self.system, None)

    def timed(self, phase: str, fn: Callable[..., Any], *args: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args)
        self.timings[phase] = time.perf_counter() - t0
        return out

    def end(self, batch: Any, adv: Any, stats: dict[str, Any]) -> dict[str, Any]:
        cfg, step = self.cfg, batch.step
        batch.timings.update(self.timings)
        batch.timings.update(self.system.timings)  # learn, broadcast
        batch.timings["step"] = time.perf_counter() - self.t_step
        record = self.recorder.record(batch, adv, stats)
        every = cfg.output.sample_every
        if (every and step % every == 0) or (step + 1 == cfg.steps and cfg.output.write_final):
            self.recorder.videos(step, self.system.decode(batch.traj.x0_hat_final[: cfg.sampler.group_size * 2]))
        if cfg.output.eval_every and (step + 1) % cfg.output.eval_every == 0:
            self.recorder.eval(step, float(self.evaluate_orm(step + 1).nanmean()))
        self.hook("step_end", step, self.system, record)
        return record


def train(cfg: RunConfig, *, resume: str | None = None, address: str | None = None, progress: bool = True,
          on_event: EventHook | None = None, evaluate: bool = True, handle_signals: bool = False) -> dict[str, Any]:
    """Run (or continue) training; returns a summary (paths, rewards before/after, per-step records).

    ``on_event(name, step, system, record)`` is called at ``step_start`` and ``step_end`` (tests and tools look
    at the live system there); ``evaluate=False`` skips the ODE evaluation before and after training;
    ``handle_signals`` (the CLI) lets a SIGTERM/SIGINT finish the running step, then stops (``stop_signal.py``)."""
    from euphonium_ray.actors.placement import check_cluster
    from euphonium_ray.actors.system import TrainingSystem
    from euphonium_ray.sampling import prompts_for_step
    from euphonium_ray.checkpoint import CheckpointError, latest_checkpoint, read_state, resolve_checkpoint
    from euphonium_ray.metrics import RayMetrics, StepRecorder
    from euphonium_ray.preflight import check_run_files
    from euphonium_ray.reward_failures import NoTrainableGroupGuard
    from euphonium_ray.run_logging import RunLogger
    from euphonium_ray.stop_signal import StopSignal

    cfg = resolve_paths(cfg)
    hook = on_event or (lambda *a: None)
    out = Path(cfg.output.dir)
    start, resume_path, skipped = 0, None, []
    if resume:
        try:
            resume_path = str(resolve_checkpoint(out, "latest", lambda f, why: skipped.append(
                f"skipped checkpoint {f}: {why}")) if resume == "latest" else resolve_checkpoint(resume, ""))
            start = int(read_state(resume_path)["step"])
        except CheckpointError as exc:
            raise RunError(f"--resume {resume}: {exc}") from None
        if start >= cfg.steps:
            raise RunError(f"checkpoint {resume_path} is at step {start}, not before steps={cfg.steps}")
    check_run_files(cfg, resume_path)  # before anything is written or started: one line per bad file
    try:
        logger = RunLogger(out, total_steps=cfg.steps, start_step=start, tensorboard=cfg.output.tensorboard,
                           progress=progress)
    except OSError as exc:  # read-only, no permission, a file in the way, disk full
        raise RunError(f"output.dir {out} cannot be written: {exc.strerror or exc} ({exc.filename or out})") from None
    for line in skipped:
        logger.warning(line)
    try:
        dataset, eval_set, pooled, latent_shape = prepare_inputs(cfg, logger.info)
        started_ray = connect(cfg, address)
        logger.on_close(send_worker_output_to(logger.logs / "ray.log"))
        if started_ray:
            logger.info(private_ray_note())
        check_cluster(cfg)
        metrics = RayMetrics("driver")
        backend = cfg.cluster.weight_sync_backend()
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.yaml")
        logger.info(f"run {out}: steps {start}..{cfg.steps}, mode {cfg.cluster.mode}, weight sync {backend}"
                    + (f", resuming from {resume_path}" if resume_path else ""))
        system = TrainingSystem(cfg, lambda idx: dataset.conditioning(idx), len(dataset), latent_shape,
                                resume=resume_path, sync_backend=backend, log=logger.info)
    except BaseException:
        logger.close()
        raise
    recorder = StepRecorder(cfg, logger, metrics, backend)
    no_signal = NoTrainableGroupGuard(cfg.rewards.max_failed_steps, str(logger.logs / "train.log"))
    n_prompts = len(dataset)
    eval_prompts = list(range(min(cfg.output.eval_count, len(eval_set))))

    def evaluate_orm(version: int) -> Any:
        """ORM rewards (per sample) of plain ODE samples of the evaluation prompts (held out when data.eval_prompts
        is set), from the same noise at every evaluation, so that differences are the policy's (and paired)."""
        return system.evaluate(version, eval_prompts, cfg.seed, eval_set.conditioning,
                               cfg.output.eval_samples_per_prompt)

    def collect(step: int, version: int) -> Any:
        """prompts -> rollouts (sampled with weight ``version``) -> rewards, for ``step``."""
        prompts = prompts_for_step(step, n_prompts, cfg.data.prompts_per_step, cfg.data.shuffle_seed)
        batch = system.score(system.rollout(step, version, prompts))
        for note in system.orm_pool.gather("take_failure_notes"):  # scorer errors, one line per distinct error
            logger.warning(note)
        return batch

    log = StepLog(cfg, system, recorder, hook, evaluate_orm)
    feed = BatchFeed(collect, ahead=cfg.cluster.mode == "async", end=cfg.steps)
    stop = StopSignal()  # installed after Ray's own driver handlers, so that ours are the ones that run
    try:
        if handle_signals:
            stop.install()
        before = log.before(start) if evaluate else None
        for step in range(start, cfg.steps):
            log.begin(step)
            batch = feed.take(step)  # sync: sampled now with weights `step`; async: during the last step's learning
            adv = log.timed("advantage", advantages, batch.traj, batch.rewards, cfg)
            no_signal.check(step, adv)  # stops after rewards.max_failed_steps steps without a trainable group
            t_overlap = time.perf_counter()
            # async: the next step's rollouts (weights `step`, published when step-1 was learned) start before this
            # step's batch is even handed over, and run while the learner learns it
            feed.prefetch(step + 1)
            system.learn(step, learning_batch(batch.traj, adv), batch.sources)
            stats = system.learned(step)
            if feed.ahead:  # the section in which sampling step+1 and learning step may run at the same time
                log.timings["overlap_section"] = time.perf_counter() - t_overlap
            system.broadcast(step + 1)  # sync: every rollout worker loads the new version; async: they fetch it
            log.end(batch, adv, stats)  # metrics, sample videos, periodic evaluation, the step_end hook
            stop.check(step, lambda: latest_checkpoint(out))  # a SIGTERM/SIGINT during the step: stop here
        after = evaluate_orm(cfg.steps) if evaluate else None
        summary = recorder.summary(before, after, start)
        logger.info(summary["text"])
        return summary
    finally:
        stop.restore()
        feed.close()
        system.close()
        if started_ray:
            import ray

            ray.shutdown()
        logger.close()  # after Ray: what its workers print while stopping still goes to logs/ray.log


# ---------------------------------------------------------------------------------------------------- cli
def _print_error(exc: BaseException) -> None:
    """``error: <line>`` for each line of the message (a preflight lists one problem per line)."""
    for line in str(exc).splitlines() or [type(exc).__name__]:
        print(f"error: {line}", file=sys.stderr)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="euphonium-ray train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="run config YAML (e.g. configs/toy.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--resume", default=None, help="'latest' (newest checkpoint under output.dir) or a step folder")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: embedded local Ray)")
    parser.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    parser.add_argument("--no-env", action="store_true", help="ignore upstream environment variables")
    args = parser.parse_args(argv)
    cfg = None
    try:
        cfg = load_config(args.config, args.set, use_env=not args.no_env)
        progress = not args.no_progress and sys.stderr.isatty()
        train(cfg, resume=args.resume, address=args.address, progress=progress, handle_signals=True)
    except Interrupted as exc:  # asked to stop: the step boundary it stopped at, and how to continue
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_status
    except EuphoniumError as exc:  # bad input or a run that cannot go on: one line per problem
        _print_error(exc)
        return 2
    except Exception as exc:  # an actor's failure: its root error in one line, the traceback in the log file
        failure = None if cfg is None else actor_failure_line(exc, Path(resolve_paths(cfg).output.dir) / "logs" /
                                                                  "train.log")
        if failure is None:
            raise
        print(f"error: {failure}", file=sys.stderr)
        return 1
    return 0
