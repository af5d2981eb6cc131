"""Reward failures on a real local Ray with the toy world: a scorer that raises on one video costs that video only;
a scorer that always raises stops the run after ``rewards.max_failed_steps`` steps with one line and exit 2; an
error raised inside an actor during the run is one line on the console with its traceback in ``logs/train.log``.

The failing scorers are outcome rewards registered by a plugin module (``plugins:``), the way a user brings one:
the toy caption judge wrapped so that it raises on purpose.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import ray
import torch

from euphonium_ray.registry import ORMS
from euphonium_ray.reward_failures import NoTrainableGroupGuard, NoTrainableGroupError

from conftest import run_config

pytestmark = pytest.mark.ray
PLUGIN = "failing_scorers_plugin"
BAD_CAPTION = "a caption this judge cannot read"
PLUGIN_SOURCE = f'''
"""Outcome rewards that fail on purpose, around the toy caption judge."""
import torch

from euphonium_ray.registry import ORMS
from euphonium_ray.toy.rewards import caption_reward

BAD_CAPTION = {BAD_CAPTION!r}


class FailsOnOneCaption:
    def __init__(self, inner):
        self.inner = inner

    def score(self, videos, captions):
        if BAD_CAPTION in captions:
            raise ValueError("cannot judge this caption")
        return self.inner.score(videos, captions)


class AlwaysFails:
    def score(self, videos, captions):
        raise ConnectionError("the judge's server is down")


class OneScoreShort:
    def __init__(self, inner):
        self.inner = inner

    def score(self, videos, captions):
        return self.inner.score(videos, captions)[:-1]


ORMS.register("fails-on-one-caption", lambda cfg, device: FailsOnOneCaption(caption_reward(cfg, device)))
ORMS.register("always-fails", lambda cfg, device: AlwaysFails())
ORMS.register("one-score-short", lambda cfg, device: OneScoreShort(caption_reward(cfg, device)))


def cannot_build(cfg, device):
    raise RuntimeError("no licence for this judge")


ORMS.register("cannot-build", cannot_build)
'''


@pytest.fixture(scope="module")
def plugin_ray(tmp_path_factory):
    """The plugin written to a folder on this process's path and on the Ray workers' (PYTHONPATH at ray.init);
    the registry and the environment are restored afterwards."""
    folder = tmp_path_factory.mktemp("plugin")
    (folder / f"{PLUGIN}.py").write_text(PLUGIN_SOURCE)
    entries, path, env = dict(ORMS._entries), list(sys.path), os.environ.get("PYTHONPATH")
    sys.path.insert(0, str(folder))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(folder)] + ([env] if env else []))
    ray.init(address="local", num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False)
    try:
        yield folder
    finally:
        ray.shutdown()
        ORMS._entries = entries
        sys.path[:] = path
        sys.modules.pop(PLUGIN, None)
        if env is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = env


def _config(world: Path, out: Path, *sets: str):
    return run_config(world, out, f"plugins=[{PLUGIN}]", "output.eval_count=1", "output.eval_samples_per_prompt=1",
                      *sets)


def test_a_scorer_that_raises_on_one_video_costs_that_video_only_the_others_keep_their_scores(world, plugin_ray,
                                                                                              tmp_path):
    from euphonium_ray.actors.reward import ORMScorer
    from euphonium_ray.toy.rewards import caption_reward

    cfg = _config(world, tmp_path, "rewards.orm.backend=fails-on-one-caption")
    scorer = ORMScorer.options(num_cpus=0).remote(cfg.model_dump(mode="json"))
    latents = torch.randn(4, 48, 8, 6, 6, generator=torch.Generator().manual_seed(0)) * 0.5
    captions = ["a red square moving left", BAD_CAPTION, "a blue circle moving up", "a red square moving left"]
    scores = ray.get(scorer.score_latents.remote(latents, captions))
    # the others' scores, computed here without the wrapper: the toy judge on the same decoded videos
    videos = ray.get(scorer.decode.remote(latents))
    judge = caption_reward(cfg, "cpu")
    expected = judge.score(videos[[0, 2, 3]], [captions[i] for i in (0, 2, 3)]).float()
    assert torch.isnan(scores[1]) and torch.isfinite(scores[[0, 2, 3]]).all()
    torch.testing.assert_close(scores[[0, 2, 3]], expected)
    assert ray.get(scorer.failure_count.remote()) == 1
    assert ray.get(scorer.take_failure_notes.remote()) == [
        f"ORM scorer failed on the video of {BAD_CAPTION!r}: ValueError: cannot judge this caption; its reward is NaN"]
    assert ray.get(scorer.take_failure_notes.remote()) == []  # handed over once
    ray.kill(scorer)


def test_the_guard_counts_only_consecutive_steps_without_a_trainable_group():
    class Adv:  # what the guard reads of learning.Advantages
        def __init__(self, kept: int) -> None:
            self.kept_rows = torch.arange(kept)
            self.skipped_groups = {} if kept else {0: "non-finite ORM reward at sample 0"}

    guard = NoTrainableGroupGuard(2)
    for step, kept in enumerate([0, 4, 0, 4, 0]):  # never two failed steps in a row
        guard.check(step, Adv(kept))
    with pytest.raises(NoTrainableGroupError, match=r"^no trainable group in 2 consecutive steps \(4\.\.5\)"):
        guard.check(5, Adv(0))


@pytest.mark.slow
def test_a_scorer_that_always_fails_stops_the_run_after_max_failed_steps_with_one_line_and_exit_2(
        world, plugin_ray, tmp_path, capsys):
    from euphonium_ray.driver import main

    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    _config(world, out, "rewards.orm.backend=always-fails", "rewards.max_failed_steps=2", "steps=5").save(config)
    assert main(["--config", str(config), "--no-env", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "error: no trainable group in 2 consecutive steps (0..1): every group had a non-finite reward; at step 1 e.g. "
        "non-finite ORM reward at sample 0; stopped at rewards.max_failed_steps=2; the scorer's errors are in "
        f"{out / 'logs' / 'train.log'}")
    assert not any("Traceback" in line for line in err)
    # the scorer's error is said once per call, naming the videos, on the console and in the run's log
    said = [line for line in err if line.startswith("[euphonium] ") and "ORM scorer failed on" in line]
    assert said and all("ConnectionError: the judge's server is down; " in line for line in said)
    assert any("ORM scorer failed on 8 videos (" in line for line in said)  # a step's 2 groups of 4, said once
    assert "ConnectionError: the judge's server is down" in (out / "logs" / "train.log").read_text()
    # step 0 went through (no update), step 1 stopped the run before its update: no step-1 record, no checkpoint
    steps = (out / "logs" / "steps.jsonl").read_text().splitlines()
    record = json.loads(steps[0])
    assert len(steps) == 1 and record["step"] == 0 and record["learner/num_updates"] == 0.0
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


@pytest.mark.slow
def test_an_error_raised_in_an_actor_during_the_run_is_one_line_with_its_traceback_in_the_run_log(
        world, plugin_ray, tmp_path, capsys):
    """A scorer that returns one score too few is broken (not failing on one video): the ORM actor raises, and the
    driver says where and what in one line; the Ray traceback goes to logs/train.log."""
    from euphonium_ray.driver import main

    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    _config(world, out, "rewards.orm.backend=one-score-short", "steps=2").save(config)
    assert main(["--config", str(config), "--no-env", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    log = out / "logs" / "train.log"
    assert err[-1] == ("error: ORMScorer.score_latents failed: ValueError: the outcome reward returned 0 scores for 1 "
                       f"videos (traceback: {log})")
    assert not any("Traceback" in line for line in err)
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "ray.exceptions.RayTaskError" in text
    assert "the outcome reward returned 0 scores for 1 videos" in text


@pytest.mark.slow
def test_a_learner_that_fails_in_ray_train_is_one_line_naming_the_learner_and_its_error(world, plugin_ray, tmp_path,
                                                                                        capsys):
    """Resuming from a step folder whose optimizer state has two parameter groups (the learner's AdamW has one):
    the files are whole and the weights match, so only the learner, inside Ray Train, finds out."""
    from euphonium_ray.checkpoint import save_checkpoint
    from euphonium_ray.driver import main
    from euphonium_ray.models.hunyuan import HunyuanVideoPolicy

    policy = HunyuanVideoPolicy.from_pretrained(world / "toy-model", with_codec=False)
    params = policy.trainable_parameters()
    step = save_checkpoint(tmp_path / "before", 1, policy,
                           torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:]}]), {})
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    # a rank's own error is final; restarts (cluster.max_learner_restarts) would only re-raise it, so none here
    _config(world, out, "steps=3", "cluster.max_learner_restarts=0").save(config)
    assert main(["--config", str(config), "--no-env", "--no-progress", "--resume", str(step)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    log = out / "logs" / "train.log"
    assert err[-1] == ("error: the learner (Ray Train) failed: CheckpointError: optimizer state has 2 param groups, "
                       f"the optimizer has 1 (traceback: {log})")
    assert not any("Traceback" in line for line in err)
    assert "ray.train.WorkerGroupError" in log.read_text()


@pytest.mark.slow
def test_an_actor_that_cannot_start_is_one_line_and_the_raylet_traceback_goes_to_ray_log(world, plugin_ray, tmp_path,
                                                                                          capsys):
    """An outcome reward whose factory raises: the ORM actor's constructor fails, Ray retries ``ready`` and its
    raylet prints the traceback with each retry; the console keeps the driver's one line only."""
    from euphonium_ray.driver import main

    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    _config(world, out, "rewards.orm.backend=cannot-build", "steps=2").save(config)
    assert main(["--config", str(config), "--no-env", "--no-progress"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert err[-1] == "error: ORM actor 0 could not start: RuntimeError: no licence for this judge"
    assert "Traceback" not in captured.err + captured.out
    assert "RuntimeError: no licence for this judge" in (out / "logs" / "ray.log").read_text()


def test_no_placement_group_outlives_the_failed_runs_above(plugin_ray):
    """The runs above failed in the learner, in an actor and at start-up, on this one Ray: each left it clean (a
    learner that fails re-raises while closing, and the roles were still shut down: their groups are gone)."""
    groups = ray.util.placement_group_table()
    assert [g["name"] for g in groups.values() if g["state"] != "REMOVED"] == []
