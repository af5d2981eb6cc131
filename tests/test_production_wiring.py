"""``configs/hunyuan_kuberay.yaml`` itself, through the Ray actors, with tiny models built here the user's way.

Only sizes (video shape, prompts per step, actor counts and shares, steps) and paths (the model folders and the
output) are overridden; everything else is the production file: HunyuanVideo family, the SoliReward ORM backend,
the latent PRM in its own pool, FSDP learners under Ray Train, the KubeRay worker-group resources (declared on the
local Ray node here, so placement goes through them), ``cluster.address: auto`` (the test's Ray is already up, as
a RayJob's is). The models are the real classes at tiny sizes: a diffusers-layout HunyuanVideo folder (transformer,
``AutoencoderKLHunyuanVideo``, both text encoders), prompt embeddings written by ``euphonium-ray preprocess``, a
SoliReward-style InternVL ORM and a latent PRM, all saved with ``save_pretrained`` and loaded back by the actors.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import ray
import torch

from euphonium_ray.config import RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
PRODUCTION = ROOT / "configs" / "hunyuan_kuberay.yaml"
VLLM_VENV = Path(os.environ.get("EUPHONIUM_VLLM_VENV", ROOT / ".venv-vllm")).resolve()
PROMPTS = ["a red square moving left", "a blue circle moving up", "a green triangle moving down",
           "a yellow circle moving right"]
FRAMES, HEIGHT, WIDTH = 5, 32, 32  # latent 16 x 2 x 4 x 4 through the tiny VAE (8x spatial, 4x causal temporal)
pytestmark = pytest.mark.ray


# ------------------------------------------------------------------------------------------- tiny models
def build_production_models(root: Path) -> dict[str, Path]:
    """Tiny stand-ins for /shared/models/HunyuanVideo, /shared/models/SoliReward, /shared/models/latent_prm and
    /shared/data/embeddings, each in the layout the production folders have."""
    from euphonium_ray.models.hunyuan import HunyuanVideoPolicy
    from euphonium_ray.models.prm import LatentPRM
    from euphonium_ray.models.tiny import build_tiny_hunyuan
    from euphonium_ray.preprocess import preprocess_prompts
    from test_orm_solireward import tiny_solireward

    paths = {"model": root / "HunyuanVideo", "orm": root / "SoliReward", "prm": root / "latent_prm",
             "embeddings": root / "embeddings"}
    if (paths["prm"] / "config.json").is_file():
        paths["prompts"] = paths["embeddings"] / "videos2caption.json"
        return paths
    build_tiny_hunyuan(paths["model"], PROMPTS, latent_channels=16, patch_size=2, num_layers=2, num_single_layers=1)
    prompts_file = root / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    paths["prompts"] = preprocess_prompts(paths["model"], prompts_file, paths["embeddings"], progress=False,
                                          max_tokens=32)
    tiny_solireward().save_pretrained(paths["orm"])
    policy = HunyuanVideoPolicy.from_pretrained(paths["model"], with_codec=False, trainable="none")
    LatentPRM.from_policy(policy.transformer, num_dual_blocks=1, num_single_blocks=0).save_pretrained(paths["prm"])
    return paths


def production_config(paths: dict[str, Path], out: Path, *sets: str) -> RunConfig:
    """configs/hunyuan_kuberay.yaml with sizes and paths made tiny (nothing else)."""
    from test_orm_solireward import FRAMES as ORM_FRAMES, SIZE as ORM_SIZE

    overrides = [
        # paths
        f"model.path={paths['model']}", f"data.prompts={paths['prompts']}", f"rewards.orm.path={paths['orm']}",
        f"rewards.prm.path={paths['prm']}", f"output.dir={out}",
        # sizes
        "steps=2", f"data.num_frames={FRAMES}", f"data.height={HEIGHT}", f"data.width={WIDTH}",
        "data.prompts_per_step=2", f"rewards.orm.num_frames={ORM_FRAMES}", f"rewards.orm.image_size={ORM_SIZE}",
        "cluster.num_rollout_workers=1", "cluster.rollout_gpus=0", "cluster.rollout_cpus=0.5",
        "cluster.num_prm_workers=1", "cluster.prm_gpus=0", "cluster.num_orm_workers=1", "cluster.orm_gpus=0",
        "cluster.num_learners=2", "cluster.learner_gpus=0", "cluster.learner_cpus=0.5",
    ]
    return load_config(PRODUCTION, overrides + list(sets), use_env=False)


def decode_each(codec, latents: torch.Tensor) -> torch.Tensor:
    """The videos of ``latents`` decoded one at a time, as the ORM actor does (a batched decode differs from it in
    the last float bits only, which the ORM turns into ~1e-5 relative differences)."""
    return torch.cat([codec.decode(latents[i:i + 1]) for i in range(latents.shape[0])])


def worker_group_resources(cfg: RunConfig) -> dict[str, float]:
    """The KubeRay worker groups' label resources the placement asks for, summed over the roles' actors."""
    from euphonium_ray.actors.placement import role_bundles

    need: dict[str, float] = {}
    for bundles in role_bundles(cfg).values():
        for bundle in bundles:
            for key, value in bundle.items():
                if key not in ("CPU", "GPU"):
                    need[key] = need.get(key, 0.0) + value
    return need


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return build_production_models(tmp_path_factory.getbasetemp() / "production-models")


@pytest.fixture(scope="module")
def kuberay_like_ray(models, tmp_path_factory):
    """A local Ray node that carries the worker-group resources of the production placement, started after the
    environment its actors inherit is set (few threads for the vLLM server)."""
    cfg = production_config(models, tmp_path_factory.mktemp("probe"))
    node = {k: float(math.ceil(v)) for k, v in worker_group_resources(cfg).items()}  # a node declares whole units
    env = pytest.MonkeyPatch()
    env.setenv("OMP_NUM_THREADS", "1")  # the vLLM server's threads: keep the shared machine's cores for others
    ray.init(address="local", num_cpus=2, resources=node, object_store_memory=300 * 1024**2,
             include_dashboard=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()
    env.undo()


# ------------------------------------------------------------------------------------------------ tests
def test_production_config_keeps_its_roles_and_only_sizes_and_paths_change(models, tmp_path):
    prod = load_config(PRODUCTION, use_env=False)
    cfg = production_config(models, tmp_path)
    assert (cfg.model.family, cfg.rewards.orm.backend, cfg.rewards.prm.kind) == ("hunyuanvideo", "solireward", "latent")
    assert cfg.rewards.prm.placement == "pool" and cfg.cluster.fsdp and cfg.cluster.address == "auto"
    assert cfg.cluster.resources == prod.cluster.resources and cfg.sampler == prod.sampler and cfg.rgg == prod.rgg
    assert cfg.optim == prod.optim and cfg.advantage == prod.advantage and cfg.model.dtype == prod.model.dtype


@pytest.mark.slow
def test_two_training_steps_of_the_production_config_through_every_ray_role(models, kuberay_like_ray, tmp_path,
                                                                            monkeypatch):
    """Rollout worker -> PRM pool (RGG gradients, latent outcome) -> ORM pool (VAE decode + SoliReward) -> two FSDP
    learners under Ray Train -> collective broadcast, twice. While it runs: every worker-group resource is in use;
    the pools score like the models loaded here; after each step the rollout worker holds the learner's weights."""
    from euphonium_ray.driver import train
    from euphonium_ray.models.codecs import load_codec
    from euphonium_ray.models.orm_solireward import SoliRewardORM
    from euphonium_ray.models.prm import LatentPRM
    from euphonium_ray.data import PromptEmbeddingDataset, pooled_dim_of

    # whole GPUs (the production shares) broadcast through the collective; here it runs over gloo
    cfg = production_config(models, tmp_path / "run", "cluster.weight_sync=collective", "cluster.weight_check=digest")
    checks: dict[str, list] = {"free_group_resources": [], "same_weights": [], "digests": []}
    dataset = PromptEmbeddingDataset(models["prompts"], pooled_dim=pooled_dim_of(models["model"]))
    cond, captions = dataset.conditioning([0, 1])
    latents = torch.randn(2, 16, 2, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(5))

    def on_event(event, step, system, record):
        if event == "step_start" and step == 0:
            total, avail = ray.cluster_resources(), ray.available_resources()
            checks["free_group_resources"] = {k: (total[k] - avail.get(k, 0.0), need)
                                              for k, need in worker_group_resources(cfg).items()}
            checks["orm_pool"] = system.orm_pool.map_rows("score_latents", latents, captions)
            checks["prm_pool"] = system.prm_pool.map_rows("score_clean", latents, cond.as_dict())
            checks["memory"] = system.role_memory()
        if event == "step_end":
            checks["digests"].append(record["digest"])
            checks["same_weights"].append([d == record["digest"] for _, d in system.worker_digests()])

    summary = train(cfg, progress=False, on_event=on_event)

    assert [h["step"] for h in summary["history"]] == [0, 1]
    taken = checks["free_group_resources"]  # in use while the step runs: the roles sit on their worker groups
    assert set(taken) == {"euphonium_rollout", "euphonium_reward", "euphonium_learner"}
    assert all(used == pytest.approx(need) for used, need in taken.values()), taken
    assert checks["same_weights"] == [[True], [True]] and checks["digests"][0] != checks["digests"][1]
    # every role reports what it holds (no CUDA here) and how long it took to load its model
    assert {role: len(reports) for role, reports in checks["memory"].items()} == {"rollout": 1, "prm": 1, "orm": 1}
    for role, (report,) in checks["memory"].items():
        assert report["load_seconds"] > 0 and report["rss_bytes"] > 0 and report["gpu_max_allocated_bytes"] == 0
    # the pools hold the production models: decode with the folder's VAE, score with the SoliReward folder / PRM
    codec = load_codec(models["model"] / "vae")
    orm = SoliRewardORM.from_pretrained(models["orm"], num_frames=cfg.rewards.orm.num_frames,
                                        image_size=cfg.rewards.orm.image_size)
    with torch.no_grad():
        expected_orm = orm.score(decode_each(codec, latents), captions)
    torch.testing.assert_close(checks["orm_pool"], expected_orm, rtol=0, atol=1e-5)
    prm = LatentPRM.from_pretrained(models["prm"])
    with torch.no_grad():
        expected_prm = prm.score(latents, torch.zeros(2), cond)
    torch.testing.assert_close(checks["prm_pool"], expected_prm.float(), rtol=0, atol=1e-5)
    # every reward of both steps is finite: ORM per video, PRM on x̂0, process rewards on the RGG window
    for h in summary["history"]:
        s = h["scalars"]
        assert all(torch.isfinite(torch.tensor(s[k])) for k in ("reward/orm_mean", "reward/prm_latent_mean",
                                                                "learner/loss"))
        assert [k for k in s if k.startswith("reward/process_step_")] == [f"reward/process_step_{k}"
                                                                          for k in range(12, 16)]
        assert s["samples/skipped"] == 0 and s["learner/num_transitions"] > 0
    assert summary["orm_eval_before"] == summary["orm_eval_before"]  # a number, not NaN
    log = (Path(cfg.output.dir) / "logs" / "train.log").read_text()
    assert "weight sync collective" in log
    ckpt = Path(cfg.output.dir) / "checkpoints" / "step-2"
    assert (ckpt / "transformer" / "diffusion_pytorch_model.safetensors").is_file()


# ------------------------------------------------------------------------------------ every ORM backend
def _orm_backends() -> list:
    """Every name ``rewards.orm.backend`` accepts (``registry.ORMS``); the vLLM judge needs its own environment."""
    from euphonium_ray.registry import ORMS

    needs_vllm = pytest.mark.skipif(not (VLLM_VENV / "bin" / "python").is_file(),
                                    reason=f"no vLLM environment at {VLLM_VENV} (make vllm-env builds it)")
    return [pytest.param(name, marks=[needs_vllm, pytest.mark.slow]) if name == "vllm" else name
            for name in ORMS.names()]


def _judge_processes(folder: Path) -> list[int]:
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"]) if str(folder) in " ".join(p.info["cmdline"] or [])]


@pytest.mark.parametrize("backend", _orm_backends())
def test_an_orm_scorer_actor_builds_and_scores_for_every_backend_the_config_allows(backend, models, kuberay_like_ray,
                                                                                   tmp_path_factory):
    """The production config with ``rewards.orm.backend`` set to each registered name (and a tiny model of that
    kind at ``rewards.orm.path``) builds an ``ORMScorer`` actor that scores: the SoliReward folder like the model
    loaded here, the shapes-world tasks like their judges on real shapes videos, the vLLM judge through the server
    it starts from its own environment, which ``close`` stops (the run's teardown calls it before killing)."""
    from euphonium_ray.actors.reward import ORMScorer
    from euphonium_ray.registry import ORMS
    from euphonium_ray.toy.data import ShapesWorld

    sets = [f"rewards.orm.backend={backend}"]
    judge = None
    if backend == "vllm":
        from test_orm_vllm import build_tiny_judge

        judge = build_tiny_judge(tmp_path_factory.mktemp("judge") / "tiny-idefics3")
        sets += [f"rewards.orm.path={judge}", "rewards.orm.dtype=fp32", f"rewards.orm.vllm.venv={VLLM_VENV}",
                 "rewards.orm.vllm.args=[--max-num-seqs, '4']"]
    cfg = production_config(models, tmp_path_factory.mktemp("orm"), *sets)
    scorer = ORMScorer.options(num_cpus=0.5).remote(cfg.model_dump(mode="json"), cpus=0.5)
    try:
        assert ray.get(scorer.ready.remote(), timeout=900)["device"] == "cpu"
        if backend.startswith("toy"):  # a shapes-world task judges shapes-world videos
            world = ShapesWorld(cfg.toy)
            captions = world.prompts[:3]
            videos = world.videos(captions, seed=3)
            got = ray.get(scorer.score_videos.remote(videos, captions))
            torch.testing.assert_close(got, ORMS.build(backend, cfg, "cpu").score(videos, captions).float().cpu())
        else:
            captions = PROMPTS[:3]
            latents = torch.randn(3, 16, 2, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(11))
            got = ray.get(scorer.score_latents.remote(latents, captions), timeout=600)
            if backend == "solireward":
                from euphonium_ray.models.codecs import load_codec
                from euphonium_ray.models.orm_solireward import SoliRewardORM

                orm = SoliRewardORM.from_pretrained(models["orm"], num_frames=cfg.rewards.orm.num_frames,
                                                    image_size=cfg.rewards.orm.image_size)
                with torch.no_grad():
                    want = orm.score(decode_each(load_codec(models["model"] / "vae"), latents), captions)
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert got.shape == (3,) and torch.isfinite(got).all() and ray.get(scorer.failure_count.remote()) == 0
        assert len(set(got.tolist())) > 1  # different videos, different scores: the comparison means something
        if judge is not None:
            assert _judge_processes(judge), "the vLLM judge's server is not running under the actor"
            ray.get(scorer.close.remote(), timeout=120)
            assert _judge_processes(judge) == []
    finally:
        ray.kill(scorer)


@pytest.mark.slow
def test_a_backend_that_cannot_start_is_one_line_naming_the_role_and_the_cause(models, kuberay_like_ray, tmp_path):
    """What ``euphonium-ray train`` prints when the ORM pool cannot load its model (here: the SoliReward folder is
    missing): the role and the loader's own message, before any step."""
    from euphonium_ray.actors.placement import RoleStartError
    from euphonium_ray.driver import train

    missing = tmp_path / "no-SoliReward"
    cfg = production_config(models, tmp_path / "run", f"rewards.orm.path={missing}")
    with pytest.raises(RoleStartError) as err:
        train(cfg, progress=False, evaluate=False)
    message = str(err.value)
    assert "\n" not in message and message.startswith("ORM actor 0 could not start: ")
    assert message.endswith(f"ORMCheckpointError: SoliReward checkpoint folder not found: {missing}")
