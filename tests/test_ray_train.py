"""End-to-end training on a real local Ray (2 CPUs): the driver, rollout worker, reward pools, Ray Train learner
and weight store together, on the toy world. Runs share one baseline so the suite stays short."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file

from euphonium_ray.driver import train
from euphonium_ray.metrics import metrics_endpoint, scrape_metrics

from conftest import ROOT, run_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]
STEPS = 4


def _weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"step-{step}" / "transformer" / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def baseline(world, local_ray, tmp_path_factory):
    """A 4-step sync run that checks, while it runs: weights after each step, the on-policy ratio, and the
    Prometheus endpoint of the node."""
    out = tmp_path_factory.mktemp("baseline")
    cfg = run_config(world, out, f"steps={STEPS}", "output.save_every=2", "cluster.weight_check=digest")
    checks: dict[str, list] = {"versions": [], "same_as_learner": [], "scrape": []}

    def on_event(event, step, system, record):
        if event != "step_end":
            return
        digests = system.worker_digests()
        checks["versions"].append([v for v, _ in digests])
        checks["same_as_learner"].append(all(d == record["digest"] for _, d in digests))
        if step == 1:  # the node's metrics agent exports within ~1 s (metrics_report_interval_ms=1000)
            url, deadline = metrics_endpoint(), time.monotonic() + 30
            while time.monotonic() < deadline:
                text = scrape_metrics(url)
                if "ray_euphonium_steps_total" in text:
                    break
                time.sleep(1.0)
            checks["scrape"].append(text)

    summary = train(cfg, progress=False, on_event=on_event, evaluate=False)
    return {"cfg": cfg, "out": out, "summary": summary, "checks": checks}


def test_after_step_k_every_rollout_worker_holds_version_k_identical_to_the_learner(baseline):
    assert baseline["checks"]["versions"] == [[k + 1] for k in range(STEPS)]
    assert baseline["checks"]["same_as_learner"] == [True] * STEPS


def test_sync_mode_first_update_of_every_step_has_importance_ratio_one(baseline):
    for h in baseline["summary"]["history"]:
        s = h["scalars"]
        assert abs(s["learner/first_ratio_min"] - 1) < 1e-5 and abs(s["learner/first_ratio_max"] - 1) < 1e-5, s
        assert s["weights/version_lag"] == 0


def test_a_euphonium_metric_is_readable_from_the_node_prometheus_endpoint_during_the_run(baseline):
    (text,) = baseline["checks"]["scrape"]
    lines = [ln for ln in text.splitlines() if ln.startswith("ray_euphonium_")]
    names = {ln.split("{")[0].split(" ")[0] for ln in lines}
    assert "ray_euphonium_steps_total" in names and "ray_euphonium_reward_orm_mean" in names, sorted(names)
    steps_line = next(ln for ln in lines if ln.startswith("ray_euphonium_steps_total"))
    assert float(steps_line.rsplit(" ", 1)[1]) >= 1


def test_outputs_have_curves_logs_checkpoints_and_videos(baseline):
    out = baseline["out"]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    steps = (out / "logs" / "steps.jsonl").read_text().splitlines()
    assert len(steps) == STEPS and "reward/orm_mean" in steps[0]
    assert (out / "logs" / "rewards.jsonl").is_file() and list((out / "samples").glob("*.gif"))
    from diffusers import HunyuanVideoTransformer3DModel

    model = HunyuanVideoTransformer3DModel.from_pretrained(out / "checkpoints" / f"step-{STEPS}" / "transformer")
    assert sum(p.numel() for p in model.parameters()) > 0


def test_each_checkpoint_is_stored_once_not_copied_into_ray_trains_storage(baseline):
    out = baseline["out"]
    ours = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ours == [f"step-{s}" for s in range(2, STEPS + 1, 2)]  # output.save_every=2
    train_storage = [p for p in (out / "ray_train").rglob("*") if p.is_file()]
    assert not [p for p in train_storage if p.suffix == ".safetensors"], train_storage


@pytest.fixture(scope="module")
def resumed_with_kills(baseline, tmp_path_factory):
    """The baseline's config trained in two runs, the second resuming the first (``resume="latest"``), with a role
    actor killed in each: the rollout worker while it samples step 1 (first run), an ORM scorer between sampling and
    scoring of step 2 (the resumed run's first step). Both must end with exactly the baseline's weights, so one pair
    of runs serves the resume test and the actor-failure test."""
    out = tmp_path_factory.mktemp("resumed-with-kills")
    cfg = baseline["cfg"].model_copy(deep=True)
    cfg.output.dir = str(out)
    killed: list[str] = []
    pids: dict[str, int] = {}

    def on_event(event, step, system, record):
        if event == "step_start" and step == 1:  # kill the rollout worker while it samples step 1
            worker = system.rollout_workers[0]
            pids["rollout_before"] = ray.get(worker.ready.remote())["pid"]

            def kill() -> None:
                time.sleep(0.3)
                ray.kill(worker, no_restart=False)
                killed.append("rollout")

            threading.Thread(target=kill, daemon=True).start()
        if event == "step_end" and step == 1:
            pids["rollout_after"] = ray.get(system.rollout_workers[0].ready.remote())["pid"]
        if event == "step_start" and step == 2:  # and an ORM scorer between sampling and scoring of step 2
            pids["orm_before"] = ray.get(system.roles.orm[0].ready.remote())["pid"]
            ray.kill(system.roles.orm[0], no_restart=False)
            killed.append("orm")
        if event == "step_end" and step == 2:
            pids["orm_after"] = ray.get(system.roles.orm[0].ready.remote())["pid"]

    first = train(cfg.model_copy(update={"steps": STEPS // 2}), progress=False, on_event=on_event, evaluate=False)
    second = train(cfg, resume="latest", progress=False, on_event=on_event, evaluate=False)
    return {"out": out, "first": first, "second": second, "killed": killed, "pids": pids}


def test_resume_latest_gives_the_same_parameters_as_an_uninterrupted_run(baseline, resumed_with_kills):
    first, second = resumed_with_kills["first"], resumed_with_kills["second"]
    assert [h["step"] for h in first["history"]] == list(range(STEPS // 2))
    assert [h["step"] for h in second["history"]] == list(range(STEPS // 2, STEPS))
    ours, reference = _weights(resumed_with_kills["out"], STEPS), _weights(baseline["out"], STEPS)
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) for k in ours)
    reference_untrained = _weights(baseline["out"], STEPS // 2)
    assert not all(torch.equal(ours[k], reference_untrained[k]) for k in ours)


def test_killing_a_rollout_and_a_reward_actor_mid_step_loses_no_step(baseline, resumed_with_kills):
    pids = resumed_with_kills["pids"]
    assert resumed_with_kills["killed"] == ["rollout", "orm"]
    assert pids["rollout_after"] != pids["rollout_before"] and pids["orm_after"] != pids["orm_before"]  # restarted
    runs = (resumed_with_kills["first"], resumed_with_kills["second"])
    assert [h["step"] for run in runs for h in run["history"]] == list(range(STEPS))
    # per-sample seeds make the retried rollouts identical, so the run matches the undisturbed baseline
    rollout_orm = [r for run in runs for r in run["rollout_orm"]]
    assert rollout_orm == pytest.approx(baseline["summary"]["rollout_orm"], abs=1e-6)
    ours, reference = _weights(resumed_with_kills["out"], STEPS), _weights(baseline["out"], STEPS)
    assert all(torch.equal(ours[k], reference[k]) for k in ours)


def test_async_mode_overlaps_with_one_step_stale_weights_and_finishes(baseline, tmp_path):
    cfg = baseline["cfg"].model_copy(deep=True)
    cfg.output.dir = str(tmp_path)
    cfg.cluster.mode = "async"
    cfg.steps = 3
    summary = train(cfg, progress=False, evaluate=False)
    lags = [h["scalars"]["weights/version_lag"] for h in summary["history"]]
    assert [h["step"] for h in summary["history"]] == [0, 1, 2] and lags == [0, 1, 1]
    assert (tmp_path / "checkpoints" / "step-3").is_dir()


def test_short_euphonium_run_raises_the_toy_orm_reward(world, local_ray, tmp_path):
    """RGG from the trained toy PRM + Dual-Reward GRPO + distillation of the guided drift, fixed seeds, 8 steps.
    (The demo adds a KL anchor to the base policy for long runs; with it these 8 steps gave +0.021 here.)
    Measured on plain ODE samples (16 prompts × 8 fixed noises, the same noise before and after, so the
    difference is the policy's) and printed with the rollouts' rewards.

    Without distillation the same 8 steps moved this ORM by +0.039, +0.028, −0.076, −0.071 at seeds 42, 7, 11, 3
    (GRPO's gradient at 32 videos per step is mostly noise); the distillation term gives a low-noise direction
    (+0.056 and +0.038 at seeds 11 and 3, measured in-process with the same library calls)."""
    prm = Path(__file__).resolve().parents[1] / "euphonium_ray" / "toy" / "assets" / "prm"  # the trained toy PRM
    cfg = run_config(world, tmp_path, "steps=8", "data.prompts_per_step=4", "sampler.group_size=8",
                     f"rewards.prm.path={prm}", "rgg.start=0", "rgg.scale=10.0", "rgg.normalize=true",
                     "optim.lr=2e-5", "optim.grad_accum=32", "optim.clip_range=0.01", "optim.distill_coef=1.0",
                     "optim.kl_coef=0.0", "output.eval_count=8", "output.eval_samples_per_prompt=8")
    summary = train(cfg, progress=False)
    before, after = summary["orm_eval_before"], summary["orm_eval_after"]
    print(f"toy ORM of ODE samples (16 prompts x 8): before {before:.4f} after {after:.4f}; rollouts per step "
          f"{[round(x, 4) for x in summary['rollout_orm']]}")
    assert after > before + 0.02


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_learners_over_gloo_share_the_groups_and_broadcast_the_trained_weights(world, local_ray, tmp_path, fsdp,
                                                                                     monkeypatch):
    """The multi-learner code paths without GPUs, on gloo: DDP with the object-store broadcast (the driver refuses
    to go on if the ranks' parameters differ) and FSDP with the collective broadcast (each rank holds half of the
    weights and AdamW state; the broadcast and the checkpoint are gathered from the shards). Each rank trains half
    of the step's groups, and the rollout worker ends every step with exactly the learner's weights."""
    from euphonium_ray.checkpoint import state_digest
    from euphonium_ray.checkpoint import latest_checkpoint, read_transformer_weights

    cfg = run_config(world, tmp_path, "steps=2", "cluster.num_learners=2", "cluster.learner_cpus=0.5",
                     "cluster.rollout_cpus=0.5", f"cluster.fsdp={str(fsdp).lower()}",
                     f"cluster.weight_sync={'collective' if fsdp else 'object_store'}", "cluster.weight_check=digest")
    same: list[bool] = []
    digests: list[str] = []

    def on_event(event, step, system, record):
        if event == "step_end":
            digests.append(record["digest"])
            same.append(all(d == record["digest"] for _, d in system.worker_digests()))

    summary = train(cfg, progress=False, on_event=on_event, evaluate=False)
    log = next(Path(cfg.output.dir).rglob("train.log")).read_text()
    assert f"weight sync {'collective' if fsdp else 'object_store'}" in log
    assert [h["step"] for h in summary["history"]] == [0, 1] and same == [True, True]
    assert digests[0] != digests[1]  # the second step changed the weights again
    # the last checkpoint (written from the gathered shards under FSDP) holds the broadcast weights
    saved = read_transformer_weights(latest_checkpoint(cfg.output.dir) / "transformer")
    assert state_digest(saved) == digests[-1]
    for h in summary["history"]:
        s = h["scalars"]
        # rank 0's share: 1 of the 2 groups (4 samples) × 4 of the 7 trainable transitions (fraction 0.6)
        assert s["learner/num_transitions"] == 16, s
        assert abs(s["learner/first_ratio_min"] - 1) < 1e-5 and abs(s["learner/first_ratio_max"] - 1) < 1e-5


def test_resume_latest_skips_a_truncated_newest_checkpoint_and_continues_from_the_newest_complete_one(
    baseline, tmp_path, capsys
):
    import shutil

    shutil.copytree(baseline["out"] / "checkpoints", tmp_path / "checkpoints")
    newest = tmp_path / "checkpoints" / f"step-{STEPS}"
    weights = newest / "transformer" / "diffusion_pytorch_model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])  # a crash of the disk, not of our atomic save
    cfg = baseline["cfg"].model_copy(deep=True)
    cfg.output.dir = str(tmp_path)
    summary = train(cfg, resume="latest", progress=False, evaluate=False)
    # it went back to step 2 and trained steps 2 and 3 again, to exactly the uninterrupted run's weights
    assert [h["step"] for h in summary["history"]] == list(range(STEPS // 2, STEPS))
    ours, reference = _weights(tmp_path, STEPS), _weights(baseline["out"], STEPS)
    assert all(torch.equal(ours[k], reference[k]) for k in reference)
    said = (f"skipped checkpoint {newest}: transformer/diffusion_pytorch_model.safetensors is {size // 2} bytes but "
            f"its header describes {size} (truncated or overwritten)")
    assert said in capsys.readouterr().err
    assert said in (tmp_path / "logs" / "train.log").read_text()


def _gcs_servers() -> set[int]:
    found = subprocess.run(["pgrep", "-x", "gcs_server"], capture_output=True, text=True).stdout.split()
    return {int(p) for p in found}


def test_sigterm_finishes_the_step_exits_143_stops_its_ray_and_resume_latest_ends_where_an_uninterrupted_run_does(
        baseline, tmp_path):
    cfg = baseline["cfg"].model_copy(deep=True)
    run = tmp_path / "run"
    cfg.output.dir, cfg.output.save_every = str(run), 1  # a checkpoint at every step boundary the signal may hit
    config = tmp_path / "config.yaml"
    cfg.save(config)
    cmd = [sys.executable, "-m", "euphonium_ray.cli", "train", "--config", str(config), "--no-progress", "--no-env"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    before = _gcs_servers()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    steps = run / "logs" / "steps.jsonl"
    deadline = time.monotonic() + 600
    while not (steps.is_file() and steps.read_text().count("\n") >= 1):  # step 0 done: the signal lands in step 1
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run did not finish its first step in 10 minutes"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 143, err[-3000:]
    done = [json.loads(line)["step"] for line in steps.read_text().splitlines()]
    last = done[-1]
    assert done == list(range(last + 1)) and last < STEPS - 1
    assert f"error: stopped by SIGTERM after step {last}; --resume latest continues from" in err
    assert (run / "checkpoints" / f"step-{last + 1}" / "state.json").is_file()  # the logs and the checkpoint agree
    assert not sorted((run / "checkpoints").glob(f"step-{last + 2}*"))  # and no checkpoint the logs never saw
    assert _gcs_servers() <= before  # the private Ray it started is gone
    # the resumed run joins this module's Ray (--address): what this test proves about stopping its own Ray is above
    resumed = subprocess.run(cmd + ["--resume", "latest", "--address", ray.get_runtime_context().gcs_address],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [json.loads(line)["step"] for line in steps.read_text().splitlines()] == list(range(STEPS))
    ours, reference = _weights(run, STEPS), _weights(baseline["out"], STEPS)
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)
