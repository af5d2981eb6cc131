"""The Ray roles one at a time, on a real local Ray with the real toy model folder (``conftest.world``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import ray
import torch

from conftest import run_config
from euphonium_ray.config import RunConfig, load_config

pytestmark = pytest.mark.ray


# ----------------------------------------------------------------------------------------------- tests
def test_rollout_worker_loads_exact_versions_and_refuses_stale_weights(world, local_ray, tmp_path):
    from euphonium_ray.actors.rollout import RolloutWorker
    from euphonium_ray.actors.weights import ObjectStoreSync, StaleWeightsError, WeightStore
    from euphonium_ray.checkpoint import state_digest
    from euphonium_ray.actors.system import TrainingSystem  # noqa: F401  (import check: the driver's phase module loads)
    from euphonium_ray.data import PromptEmbeddingDataset, pooled_dim_of
    from euphonium_ray.models.hunyuan import HunyuanVideoPolicy

    cfg = run_config(world, tmp_path)
    store = WeightStore.remote()
    learner = HunyuanVideoPolicy.from_pretrained(cfg.model.path, with_codec=False)
    publisher = ObjectStoreSync(store)
    publisher.publish(0, learner.sync_state_dict())
    with torch.no_grad():
        for p in learner.transformer.parameters():
            p.add_(0.01)
    publisher.publish(1, learner.sync_state_dict())
    worker = RolloutWorker.options(num_cpus=0.5).remote(cfg.model_dump(mode="json"), 0, store)
    version, digest = ray.get([worker.load_weights.remote(1), worker.param_digest.remote()])[1]
    assert version == 1 and digest == state_digest(learner.sync_state_dict())

    ds = PromptEmbeddingDataset(cfg.data.prompts, pooled_dim=pooled_dim_of(cfg.model.path))
    cond, caps = ds.conditioning([0])
    request = {"step": 2, "version": 1, "cond": cond.repeat_interleave(4).as_dict(), "captions": caps * 4,
               "prompt_indices": [0] * 4, "seeds": [1, 2, 3, 4], "latent_shape": (48, 8, 6, 6)}
    with pytest.raises(StaleWeightsError, match="needs weight version ≥ 2"):
        ray.get(worker.sample.remote(request))
    out = ray.get(worker.sample.remote({**request, "step": 1}))
    assert out["traj"]["weight_version"] == 1 and out["traj"]["latents"].shape == (4, 9, 48, 8, 6, 6)
    ray.kill(worker)


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_collective_broadcast_over_gloo_delivers_identical_weights(local_ray, dtype):
    """Bit identity (full SHA-256) of what every receiver gets with what the learner sent, cast to the rollout
    dtype on the learner's side when one is given; each receiver's cheap check passes on it."""
    from euphonium_ray.actors.weights import CollectiveSync, WeightStore
    from euphonium_ray.checkpoint import state_digest

    store = WeightStore.remote()
    cast = getattr(torch, dtype) if dtype else None

    @ray.remote(num_cpus=0)
    class Member:
        def __init__(self, rank: int, store) -> None:
            self.sync = CollectiveSync(store, rank, 3, dtype=cast)

        def send(self, version: int, seed: int) -> str:
            g = torch.Generator().manual_seed(seed)
            state = {"w": torch.randn(5, 7, generator=g), "b": torch.randn(3, generator=g).bfloat16(),
                     "step": torch.tensor([version])}
            self.sync.publish(version, state)
            return state_digest({k: v.to(cast) if cast and v.is_floating_point() else v for k, v in state.items()})

        def receive(self, version: int) -> str:
            got, state = self.sync.fetch(version, version - 1, 60)
            assert got == version
            self.sync.verify(version, {k: v.clone() for k, v in state.items()})
            return state_digest(state)

    members = [Member.remote(r, store) for r in range(3)]
    for version in (0, 1):
        refs = [members[0].send.remote(version, 10 + version)] + [m.receive.remote(version) for m in members[1:]]
        sent, *received = ray.get(refs, timeout=120)
        assert received == [sent, sent]


def test_orm_pool_balances_rows_and_gives_nan_for_an_unjudgeable_video_then_the_group_is_skipped(world, local_ray,
                                                                                                  tmp_path):
    from euphonium_ray.actors.reward import ORMScorer, ScorerPool
    from euphonium_ray.learning import compute_advantages
    from euphonium_ray.trajectory import Trajectories

    cfg = run_config(world, tmp_path)
    actors = [ORMScorer.options(num_cpus=0).remote(cfg.model_dump(mode="json")) for _ in range(2)]
    pool = ScorerPool(actors)
    latents = torch.randn(6, 48, 8, 6, 6, generator=torch.Generator().manual_seed(0)) * 0.5
    latents[4] = float("nan")  # a corrupted sample
    captions = ["a red square moving left"] * 3 + ["a blue circle moving up"] * 3
    scores = pool.map_rows("score_latents", latents, captions)
    direct = ray.get(actors[0].score_latents.remote(latents[:4], captions[:4]))
    torch.testing.assert_close(scores[:4], direct)
    assert torch.isnan(scores[4]) and torch.isfinite(scores[5])
    assert sum(ray.get([a.failure_count.remote() for a in actors])) == 1

    b, n = 6, 2
    traj = Trajectories(latents=torch.zeros(b, n + 1, 1), sigmas=torch.tensor([1.0, 0.5, 0.0]),
                        log_probs=torch.zeros(b, n), process_rewards=torch.zeros(b, n),
                        process_evaluated=torch.zeros(b, n, dtype=torch.bool), guidance_norms=torch.zeros(b, n),
                        guided_steps=torch.zeros(0, dtype=torch.long), guided_means=torch.zeros(b, 0, 1),
                        guidance_shifts=torch.zeros(b, 0, 1), x0_hat_final=torch.zeros(b, 1),
                        group_ids=torch.arange(b) // 3, prompt_indices=torch.arange(b) // 3,
                        sample_seeds=torch.arange(b), cond=_cond(b), captions=captions, group_size=3)
    adv = compute_advantages(traj, scores, None, cfg)
    assert adv.kept_rows.tolist() == [0, 1, 2] and 1 in adv.skipped_groups
    assert "sample 4" in adv.skipped_groups[1]


def _cond(b: int):
    from euphonium_ray.models.base import TextConditioning

    return TextConditioning(torch.zeros(b, 2, 4), torch.ones(b, 2, dtype=torch.long), torch.zeros(b, 3))


def test_more_gpus_than_the_cluster_has_is_a_clear_error_before_anything_is_reserved(world, local_ray, tmp_path):
    from euphonium_ray.actors.placement import ClusterResourceError, check_cluster, role_bundles

    cfg = run_config(world, tmp_path, "cluster.rollout_gpus=1", "cluster.learner_gpus=2")
    with pytest.raises(ClusterResourceError, match=r"asks for 3 GPU \(rollout 1, learner 2\) but the Ray cluster has 0"
                                                   r".*cluster.rollout_gpus, cluster.learner_gpus"):
        check_cluster(cfg)
    assert ray.util.placement_group_table() == {}  # nothing was reserved
    custom = run_config(world, tmp_path, 'cluster.resources={"rollout": {"rollout_group": 1}}')
    assert role_bundles(custom)["rollout"] == [{"CPU": 0.5, "rollout_group": 1.0}]
    with pytest.raises(ClusterResourceError, match="rollout_group"):
        check_cluster(custom)
    assert check_cluster(run_config(world, tmp_path))["CPU"] == 1.0
    assert os.environ.get("RAY_AUTH_MODE", "disabled") == "disabled"


# ------------------------------------------------------------------------------------------- bad input
def _config_file(cfg: RunConfig, path: Path) -> str:
    cfg.save(path)
    return str(path)


def test_train_command_names_a_missing_model_folder(world, tmp_path, capsys):
    from euphonium_ray.driver import main

    cfg = run_config(world, tmp_path / "out", "model.family=hunyuanvideo", f"model.path={tmp_path / 'no-such-model'}")
    assert main(["--config", _config_file(cfg, tmp_path / "c.yaml"), "--no-env"]) == 2
    assert f"model folder not found: {tmp_path / 'no-such-model'}" in capsys.readouterr().err


def _index_with_a_missing_file(world: Path, path: Path, entry: int, key: str, rows: int | None = None) -> Path:
    """A copy of the toy ``videos2caption.json`` (its first ``rows`` entries) whose ``entry`` points ``key`` at a
    file that does not exist, ``<tmp>/gone/<entry>.pt``."""
    import json

    index = json.loads((world / "toy-model" / "embeddings" / "videos2caption.json").read_text())[:rows]
    index[entry][key] = str(path.parent / "gone" / f"{entry}.pt")
    path.write_text(json.dumps(index))
    return path


def test_train_command_names_a_prompt_file_pointing_at_a_missing_embedding(world, tmp_path, capsys):
    from euphonium_ray.driver import main

    bad = _index_with_a_missing_file(world, tmp_path / "videos2caption.json", 3, "prompt_embed_path")
    cfg = run_config(world, tmp_path / "out", f"data.prompts={bad}")
    assert main(["--config", _config_file(cfg, tmp_path / "c.yaml"), "--no-env"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "entry 3" in err and str(tmp_path / "gone" / "3.pt") in err


def test_train_command_names_an_eval_prompt_file_pointing_at_a_missing_embedding(world, tmp_path, capsys):
    from euphonium_ray.driver import main

    bad = _index_with_a_missing_file(world, tmp_path / "heldout.json", 1, "prompt_attention_mask", rows=4)
    cfg = run_config(world, tmp_path / "out", f"data.eval_prompts={bad}")
    assert main(["--config", _config_file(cfg, tmp_path / "c.yaml"), "--no-env"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "entry 1" in err and str(tmp_path / "gone" / "1.pt") in err
    assert not (tmp_path / "out" / "checkpoints").exists()  # refused before anything was trained


def test_train_command_refuses_more_gpus_than_the_cluster_has_without_hanging(world, local_ray, tmp_path, capsys):
    import time

    from euphonium_ray.driver import main

    cfg = run_config(world, tmp_path / "out", "cluster.rollout_gpus=1")
    t0 = time.monotonic()
    assert main(["--config", _config_file(cfg, tmp_path / "c.yaml"), "--no-env"]) == 2
    assert time.monotonic() - t0 < 60
    assert "asks for 1 GPU (rollout 1) but the Ray cluster has 0" in capsys.readouterr().err


def test_a_nan_reward_is_logged_and_its_group_skipped_by_the_step_recorder(world, local_ray, tmp_path):
    import json

    from euphonium_ray.actors.system import StepBatch
    from euphonium_ray.step import Rewards
    from euphonium_ray.learning import compute_advantages
    from euphonium_ray.metrics import RayMetrics, StepRecorder
    from euphonium_ray.run_logging import RunLogger

    cfg = run_config(world, tmp_path)
    b, n = 4, 2
    from euphonium_ray.trajectory import Trajectories

    traj = Trajectories(latents=torch.zeros(b, n + 1, 1), sigmas=torch.tensor([1.0, 0.5, 0.0]),
                        log_probs=torch.zeros(b, n), process_rewards=torch.zeros(b, n),
                        process_evaluated=torch.zeros(b, n, dtype=torch.bool), guidance_norms=torch.zeros(b, n),
                        guided_steps=torch.zeros(0, dtype=torch.long), guided_means=torch.zeros(b, 0, 1),
                        guidance_shifts=torch.zeros(b, 0, 1), x0_hat_final=torch.zeros(b, 1),
                        group_ids=torch.arange(b) // 2, prompt_indices=torch.arange(b) // 2,
                        sample_seeds=torch.arange(b), cond=_cond(b), captions=["a"] * b, group_size=2)
    orm = torch.tensor([0.5, float("nan"), 0.2, 0.4])
    batch = StepBatch(0, 0, traj, Rewards(orm), {"rollout": 1.0})
    logger = RunLogger(tmp_path, total_steps=1, progress=False)
    recorder = StepRecorder(cfg, logger, RayMetrics("driver"))
    recorder.record(batch, compute_advantages(traj, orm, None, cfg), {"version": 1})
    logger.close()
    log = (tmp_path / "logs" / "train.log").read_text()
    assert "step 0: group 0 skipped (non-finite ORM reward at sample 1)" in log
    row = json.loads((tmp_path / "logs" / "rewards.jsonl").read_text())
    assert row["orm"][1] is None and row["skipped_groups"] == {"0": "non-finite ORM reward at sample 1"}
    assert recorder.history[0]["scalars"]["samples/skipped"] == 2


def test_lora_training_broadcasts_only_the_adapter_tensors(world, local_ray, tmp_path):
    from euphonium_ray.actors.rollout import RolloutWorker
    from euphonium_ray.actors.weights import ObjectStoreSync, WeightStore
    from euphonium_ray.checkpoint import state_digest
    from euphonium_ray.models.hunyuan import HunyuanVideoPolicy

    cfg = run_config(world, tmp_path, "model.trainable=lora", "model.lora_rank=2")
    learner = HunyuanVideoPolicy.from_pretrained(cfg.model.path, with_codec=False, trainable="lora", lora_rank=2,
                                                 lora_alpha=cfg.model.lora_alpha)
    with torch.no_grad():
        for p in learner.trainable_parameters():
            p.add_(0.05)
    state = learner.sync_state_dict()
    full = sum(t.numel() for t in learner.transformer.state_dict().values())
    assert state and all("lora_" in k for k in state) and sum(t.numel() for t in state.values()) < full / 5
    store = WeightStore.remote()
    ObjectStoreSync(store).publish(4, state)
    worker = RolloutWorker.options(num_cpus=0.5).remote(cfg.model_dump(mode="json"), 0, store)
    ray.get(worker.load_weights.remote(4))
    assert ray.get(worker.param_digest.remote()) == (4, state_digest(state))
    assert ray.get(store.latest.remote())[2]["nbytes"] == sum(t.numel() * 4 for t in state.values())


def test_object_store_sync_publishes_the_bf16_cast_from_reused_buckets_and_the_check_catches_a_changed_value(
        local_ray):
    from euphonium_ray.actors.weights import ObjectStoreSync, WeightCheckError, WeightStore
    from euphonium_ray.checkpoint import state_digest

    store = WeightStore.remote()
    g = torch.Generator().manual_seed(0)
    state = {"a.w": torch.randn(9, 5, generator=g), "b.w": torch.randn(11, generator=g),
             "step": torch.tensor([3])}
    learner, worker = ObjectStoreSync(store, torch.bfloat16), ObjectStoreSync(store, torch.bfloat16)
    learner.publish(0, state)
    buckets = learner._host or learner._device  # a CPU learner's device bucket is its host bucket
    assert buckets is not None
    host = {d: b.data_ptr() for d, b in buckets.buffers.items()}
    moved = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    meta = learner.publish(1, moved)
    after = {d: b.data_ptr() for d, b in (learner._host or learner._device).buffers.items()}
    assert after == host  # no allocation per version
    version, got = worker.fetch(1, 0, 30)
    want = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in moved.items()}
    assert version == 1 and state_digest(got) == state_digest(want)
    assert meta["bytes"] < sum(v.numel() * v.element_size() for v in moved.values())  # bf16 travelled, not fp32
    live = {k: v.clone() for k, v in got.items()}
    worker.verify(1, live)
    live["b.w"][4] = live["b.w"][4] + 1
    with pytest.raises(WeightCheckError, match="weight version 1"):
        worker.verify(1, live)


def test_prompt_order_and_sample_seeds_are_pure_functions_of_the_step():
    from euphonium_ray.sampling import prompts_for_step, seeds_for

    epoch = [p for step in range(12) for p in prompts_for_step(step, 48, 4, seed=7)]
    assert sorted(epoch) == list(range(48))  # every prompt once per epoch
    assert prompts_for_step(13, 48, 4, 7) == prompts_for_step(13, 48, 4, 7) != prompts_for_step(13, 48, 4, 8)
    seeds = seeds_for(42, 3, [5, 9, 5], 2, 48)
    assert len(set(seeds)) == 6 and seeds == seeds_for(42, 3, [5, 9, 5], 2, 48)
    assert seeds[:2] == seeds_for(42, 3, [5], 2, 48)  # a prompt's seeds do not depend on its batch-mates


def test_nccl_broadcast_is_chosen_only_for_whole_gpus_and_shared_gpus_are_named_by_role(monkeypatch):
    """NCCL refuses two ranks on one GPU (measured on an H200: "Duplicate GPU detected", NCCL 2.28), so a
    fractional-GPU layout that fits one GPU defaults to CUDA IPC, one that may not to the object store, and a forced collective names the members that collide."""
    from euphonium_ray.actors.weights import ranks_sharing_a_device

    def backend(learner: float, rollout: float, *sets: str, environ: dict[str, str] | None = None) -> str:
        cfg = load_config(None, [f"cluster.learner_gpus={learner}", f"cluster.rollout_gpus={rollout}", *sets],
                          environ=environ or {}, use_env=True)
        return cfg.cluster.weight_sync_backend()

    assert backend(1, 1) == "collective"
    assert backend(0.5, 0.5) == backend(0.25, 0.25, "cluster.num_rollout_workers=3") == "cuda_ipc"  # one GPU
    assert backend(0.5, 0.5, "cluster.num_rollout_workers=2") == "object_store"  # 1.5 GPUs: not all on one
    assert backend(1, 0.5) == backend(0, 1) == backend(0, 0) == "object_store"
    assert backend(0.5, 0.5, "cluster.weight_sync=collective") == "collective"
    assert backend(1, 1, "cluster.weight_sync=object_store") == "object_store"
    where = {0: "10.0.0.1/GPU-a", 1: "10.0.0.1/GPU-b", 2: "10.0.0.1/GPU-a", 3: "10.0.0.2/GPU-a", 4: "10.0.0.1/GPU-b"}
    assert ranks_sharing_a_device(where) == [[0, 2], [1, 4]]
    assert ranks_sharing_a_device({0: "n/GPU-a", 1: "n/GPU-b"}) == []


def test_a_colocated_prm_and_the_prm_pool_guide_the_same_samples(world, local_ray, tmp_path):
    """``rewards.prm.placement: colocated`` (the default: the rollout worker holds its own PRM copy and RGG costs no
    round trip per guided SDE step) samples what ``pool`` (a PRM actor called at every guided step, the gradients
    through the object store) samples, from the same seeds."""
    from euphonium_ray.actors.reward import PRMScorer, ScorerPool
    from euphonium_ray.actors.rollout import RolloutWorker
    from euphonium_ray.actors.weights import ObjectStoreSync, WeightStore
    from euphonium_ray.data import PromptEmbeddingDataset, pooled_dim_of
    from euphonium_ray.models.hunyuan import HunyuanVideoPolicy
    from euphonium_ray.wire import unpack

    store = WeightStore.remote()
    colocated = run_config(world, tmp_path, "rgg.start=4")
    ObjectStoreSync(store).publish(0, HunyuanVideoPolicy.from_pretrained(colocated.model.path,
                                                                          with_codec=False).sync_state_dict())
    ds = PromptEmbeddingDataset(colocated.data.prompts, pooled_dim=pooled_dim_of(colocated.model.path))
    cond, caps = ds.conditioning([0])
    request = {"step": 0, "version": 0, "cond": cond.repeat_interleave(4).as_dict(), "captions": caps * 4,
               "prompt_indices": [0] * 4, "seeds": [11, 12, 13, 14], "latent_shape": (48, 8, 6, 6)}
    pooled = run_config(world, tmp_path, "rgg.start=4", "rewards.prm.placement=pool")
    prm = PRMScorer.options(num_cpus=0).remote(pooled.model_dump(mode="json"), cpus=1.0)
    trajs = []
    for cfg, pool in ((colocated, None), (pooled, ScorerPool([prm]))):
        worker = RolloutWorker.options(num_cpus=0.5).remote(cfg.model_dump(mode="json"), 0, store, prm_pool=pool,
                                                            cpus=1.0)
        trajs.append(unpack(ray.get(worker.sample.remote(request))["traj"]))
        ray.kill(worker)
    ray.kill(prm)
    a, b = trajs
    assert bool(a["process_evaluated"].any()) and int(a["guided_steps"].numel()) == 4  # guided from step 4 of 8
    for name in ("latents", "log_probs", "process_rewards", "guidance_norms", "x0_hat_final"):
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
