"""Fixtures shared by several test files: the toy world on disk (``world``), its small run config
(``run_config``) and a local Ray (``local_ray``).

``world`` is a model folder made by the toy world's own ``build_toy_model`` (the committed pretrained policy, the
exact pixel-unshuffle codec, prompt embeddings) and a latent PRM built from the policy's first block
(``LatentPRM.from_policy``, untrained: the tests that use it check plumbing, not PRM quality). A test file may
define its own ``world`` (a different world); pytest then uses that one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from euphonium_ray.config import RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- toy world
def toy_world(base: Path) -> Path:
    """Build (once per session folder) ``base/toy-model`` and ``base/toy-prm``."""
    from euphonium_ray.models.hunyuan import HunyuanVideoPolicy
    from euphonium_ray.models.prm import LatentPRM
    from euphonium_ray.toy.build import build_toy_model

    model, prm = base / "toy-model", base / "toy-prm"
    if not (prm / "config.json").is_file():
        cfg = load_config(ROOT / "configs" / "toy.yaml", use_env=False)
        build_toy_model(model, cfg, log=lambda m: None)
        policy = HunyuanVideoPolicy.from_pretrained(model, with_codec=False)
        LatentPRM.from_policy(policy.transformer, 1, 0).save_pretrained(prm)
    return base


def run_config(world: Path, out: Path, *sets: str) -> RunConfig:
    """configs/toy.yaml made small: 2 prompts × 4 samples per step, 8 SDE steps, RGG from step 5, a one-sample
    ODE evaluation."""
    base = [
        f"model.path={world / 'toy-model'}",
        f"data.prompts={world / 'toy-model' / 'embeddings' / 'videos2caption.json'}", "data.eval_prompts=null",
        f"rewards.prm.path={world / 'toy-prm'}",
        f"output.dir={out}",
        "steps=3", "data.prompts_per_step=2", "sampler.group_size=4", "sampler.num_steps=8", "rgg.start=5", "spsa.start=5",
        "optim.grad_accum=4", "cluster.num_cpus=2", "cluster.rollout_cpus=0.5", "cluster.learner_cpus=0.5",
        "output.save_every=100", "output.sample_every=100",
        # the ODE evaluation before/after a run that evaluates (the CLI does): one prompt, one sample, as the tests
        # that use it only need it to run; a test that measures with it sets its own size
        "output.eval_count=1", "output.eval_samples_per_prompt=1",
        # the method these tests were written for (full fine-tuning, caption reward, normalised guidance of every
        # member, input-credited process rewards, distillation): pinned here, so the demo's tuning can move on
        "model.trainable=full", "rewards.orm.backend=toy", "rewards.latent_outcome=true", "rgg.scale_mode=fixed",
        "rgg.scale=10.0", "rgg.normalize=true", "rgg.guided_fraction=1.0", "advantage.process_credit=input",
        "optim.lr=2e-5", "optim.clip_range=0.01", "optim.distill_coef=1.0", "optim.kl_coef=1.0",
    ]
    return load_config(ROOT / "configs" / "toy.yaml", base + list(sets), use_env=False)


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    return toy_world(tmp_path_factory.getbasetemp() / "toy-world")


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False,
             _system_config={"metrics_report_interval_ms": 1000})
    yield
    ray.shutdown()
