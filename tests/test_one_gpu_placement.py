"""Every role on one GPU: fractional shares (``cluster.*_gpus`` = 0.25) put the rollout worker, the PRM pool, the ORM
pool and the learner on a single device. Checked on CPU against a Ray node that declares one GPU (Ray hands out
shares of it and sets each actor's GPU ids; torch sees no CUDA, so the models run on CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
from ray.util.placement_group import placement_group, remove_placement_group

from euphonium_ray.config import load_config

from conftest import run_config

ROOT = Path(__file__).resolve().parents[1]
QUARTERS = [f"cluster.{role}_gpus=0.25" for role in ("rollout", "prm", "orm", "learner")]


def _toy(*sets: str):
    """The toy config with a PRM pool (it scores the latent outcome), so that all four roles are placed."""
    return load_config(ROOT / "configs" / "toy.yaml", ["rewards.latent_outcome=true", *sets], use_env=False)


def test_four_roles_on_quarter_shares_ask_for_exactly_one_gpu_and_sync_weights_through_cuda_ipc():
    from euphonium_ray.actors.placement import check_cluster

    cfg = _toy(*QUARTERS)
    need = check_cluster(cfg, available={"CPU": 2.0, "GPU": 1.0})
    assert need["GPU"] == 1.0 and need["CPU"] == 2.0  # rollout 1 CPU + learner 1 CPU; reward actors none
    assert cfg.cluster.weight_sync_backend() == "cuda_ipc"  # NCCL would refuse members sharing the GPU


def test_roles_asking_for_more_than_one_gpu_in_shares_are_named_with_their_config_keys():
    from euphonium_ray.actors.placement import ClusterResourceError, check_cluster

    cfg = _toy(*[s.replace("0.25", "0.3") for s in QUARTERS])
    with pytest.raises(ClusterResourceError, match=r"asks for 1\.2 GPU \(rollout 0\.3, orm 0\.3, learner 0\.3, "
                                                   r"prm 0\.3\) but the Ray cluster has 1"):
        check_cluster(cfg, available={"CPU": 2.0, "GPU": 1.0})


def test_two_learners_on_half_a_gpu_each_are_refused_before_nccl_would_refuse_them():
    from euphonium_ray.actors.placement import ClusterResourceError, check_cluster

    shared = _toy("cluster.num_learners=2", "cluster.learner_gpus=0.5", "data.prompts_per_step=4")
    with pytest.raises(ClusterResourceError, match=r"cluster\.num_learners=2 learners on cluster\.learner_gpus=0\.5 "
                                                   r"each would put two NCCL ranks on one GPU"):
        check_cluster(shared, available={"CPU": 8.0, "GPU": 8.0})
    whole = _toy("cluster.num_learners=2", "cluster.learner_gpus=1", "data.prompts_per_step=4")
    assert check_cluster(whole, available={"CPU": 8.0, "GPU": 2.0})["GPU"] == 2.0


@pytest.fixture(scope="module")
def ray_with_one_gpu():
    ray.init(address="local", num_cpus=2, num_gpus=1, object_store_memory=200 * 1024**2, include_dashboard=False,
             _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


@pytest.mark.ray
def test_rollout_prm_and_orm_actors_start_on_quarters_of_gpu_0_leaving_the_learners_quarter(
        world, ray_with_one_gpu, tmp_path):
    from euphonium_ray.actors.placement import start_roles
    from euphonium_ray.actors.weights import WeightStore

    cfg = run_config(world, tmp_path, *QUARTERS, "cluster.timeouts.reserve_s=60")
    roles = start_roles(cfg, WeightStore.remote(), sync_backend="object_store")
    learner_pg = None
    try:
        infos = ray.get([a.ready.remote() for a in roles.rollout + roles.prm + roles.orm], timeout=60)
        assert len(infos) == 3 and all(i["gpu_ids"] == [0] for i in infos), infos
        assert ray.available_resources().get("GPU") == pytest.approx(0.25)
        # what Ray Train reserves for the learner: the last quarter fits, and then the GPU is full
        learner_pg = placement_group([{"CPU": cfg.cluster.learner_cpus, "GPU": 0.25}])
        assert ray.wait([learner_pg.ready()], timeout=30)[0], "the learner's quarter of the GPU was not free"
        assert "GPU" not in ray.available_resources()
    finally:
        roles.shutdown(cfg.cluster.timeouts.shutdown_s)
        if learner_pg is not None:
            remove_placement_group(learner_pg)
