"""Placement: what each role asks for, a check against the cluster before anything is reserved, one placement
group per role, and the role actors created inside them.

Resources per actor come from ``cluster.*`` (CPUs, GPUs) plus ``cluster.resources[role]`` (custom resources
such as a KubeRay worker group's label resource; a ``CPU`` entry there overrides the CPU share). Reward actors
declare no CPU by default (they are light next to the policy); a role whose bundle would be empty runs without
a placement group. The learner's group is made by Ray Train from the same numbers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from euphonium_ray.config import RunConfig
from euphonium_ray.errors import EuphoniumError

__all__ = ["ClusterResourceError", "RoleActors", "RoleStartError", "check_cluster", "check_gpu_sharing", "needs_prm_pool", "role_bundles",
           "start_roles"]

ROLES = ("rollout", "prm", "orm", "learner")
_CONFIG_KEYS = {"rollout": "cluster.rollout_gpus", "prm": "cluster.prm_gpus", "orm": "cluster.orm_gpus",
                "learner": "cluster.learner_gpus"}


class ClusterResourceError(EuphoniumError, RuntimeError):
    """The config asks for more than the Ray cluster has (or could not reserve it in time)."""


class RoleStartError(EuphoniumError, RuntimeError):
    """A role's actor failed while loading its model; the message names the role and the actor's own error."""


def _last_error_line(exc: BaseException) -> str:
    """The actor's own exception (``Type: message``), the last line of Ray's creation-task traceback."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def needs_prm_pool(cfg: RunConfig) -> bool:
    """A PRM pool exists for RGG with ``prm.placement: pool`` or to score the latent outcome reward (a trained
    latent PRM only: the oracle lives with the rollout policy, and its latent outcome would be the ORM itself)."""
    return cfg.rewards.prm.kind == "latent" and bool(cfg.rewards.prm.path) and (
        (cfg.rgg.enabled and cfg.rewards.prm.placement == "pool") or cfg.rewards.latent_outcome
    )


def _bundle(cpus: float, gpus: float, custom: dict[str, float]) -> dict[str, float]:
    b = {"CPU": float(custom.get("CPU", cpus)), "GPU": float(gpus)}
    b.update({k: float(v) for k, v in custom.items() if k != "CPU"})
    return {k: v for k, v in b.items() if v > 0}


def role_bundles(cfg: RunConfig) -> dict[str, list[dict[str, float]]]:
    """One resource bundle per actor of each role (an empty dict: no reservation)."""
    c, r = cfg.cluster, cfg.cluster.resources
    out = {
        "rollout": [_bundle(c.rollout_cpus, c.rollout_gpus, r.get("rollout", {}))] * c.num_rollout_workers,
        "orm": [_bundle(0.0, c.orm_gpus, r.get("orm", {}))] * c.num_orm_workers,
        "learner": [_bundle(c.learner_cpus, c.learner_gpus, r.get("learner", {}))] * c.num_learners,
    }
    out["prm"] = [_bundle(0.0, c.prm_gpus, r.get("prm", {}))] * c.num_prm_workers if needs_prm_pool(cfg) else []
    return out


def check_gpu_sharing(cfg: RunConfig) -> None:
    """Roles may share a GPU (fractional ``cluster.*_gpus``: one machine, one GPU, every role on a share), but the
    learner's ranks may not share one with each other: their NCCL group refuses two ranks on one GPU ("Duplicate
    GPU detected"), and Ray packs fractional bundles onto the same GPU. Raise ClusterResourceError before that."""
    c = cfg.cluster
    if c.num_learners > 1 and 0 < c.learner_gpus < 1:
        raise ClusterResourceError(
            f"cluster.num_learners={c.num_learners} learners on cluster.learner_gpus={c.learner_gpus:g} each would "
            "put two NCCL ranks on one GPU, which NCCL refuses; give each learner a whole GPU "
            "(cluster.learner_gpus: 1) or use one learner (cluster.num_learners: 1)"
        )


def check_cluster(cfg: RunConfig, available: dict[str, float] | None = None) -> dict[str, float]:
    """Raise ClusterResourceError, naming the resource, the roles asking and the config keys, when the sum of
    all roles' bundles exceeds what ``ray.cluster_resources()`` reports, or when learner ranks would share a GPU.
    Returns the totals asked for."""
    check_gpu_sharing(cfg)
    have = dict(ray.cluster_resources() if available is None else available)
    need: dict[str, float] = {}
    by_role: dict[str, dict[str, float]] = {}
    for role, bundles in role_bundles(cfg).items():
        for b in bundles:
            for key, value in b.items():
                need[key] = need.get(key, 0.0) + value
                by_role.setdefault(key, {}).setdefault(role, 0.0)
                by_role[key][role] += value
    for key, value in need.items():
        if value > have.get(key, 0.0) + 1e-9:
            parts = ", ".join(f"{role} {amount:g}" for role, amount in by_role[key].items())
            hint = ""
            if key == "GPU":
                hint = " (set " + ", ".join(_CONFIG_KEYS[r] for r in by_role[key]) + " to fit)"
            raise ClusterResourceError(
                f"the config asks for {value:g} {key} ({parts}) but the Ray cluster has {have.get(key, 0.0):g}{hint}"
            )
    return need


@dataclass
class RoleActors:
    """Handles of everything the driver placed, for the loop and for teardown."""

    rollout: list[Any]
    prm: list[Any]
    orm: list[Any]
    groups: list[PlacementGroup] = field(default_factory=list)

    def shutdown(self, close_timeout_s: float) -> None:
        try:  # scorers that started servers stop them before they are killed
            ray.get([a.close.remote() for a in self.orm], timeout=close_timeout_s)
        except Exception:  # noqa: BLE001 - best-effort teardown: a dead or hung scorer is killed below
            pass
        for actor in self.rollout + self.prm + self.orm:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - best-effort teardown
                pass
        for pg in self.groups:
            try:
                remove_placement_group(pg)
            except Exception:  # noqa: BLE001
                pass


def _reserve(role: str, bundles: list[dict[str, float]], timeout_s: float) -> PlacementGroup | None:
    if not bundles or not any(bundles):
        return None
    pg = placement_group([b or {"CPU": 0.001} for b in bundles], strategy="PACK", name=f"euphonium-{role}")
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise ClusterResourceError(f"could not reserve the {role} placement group {bundles} within {timeout_s:.0f}s")
    return pg


def _options(pg: PlacementGroup | None, index: int, bundle: dict[str, float], cfg: RunConfig) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "num_cpus": bundle.get("CPU", 0.0),
        "num_gpus": bundle.get("GPU", 0.0),
        "resources": {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")},
        "max_restarts": cfg.cluster.max_actor_restarts,
        "max_task_retries": cfg.cluster.max_task_retries,
    }
    if pg is not None:
        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index)
    return opts


def start_roles(cfg: RunConfig, store: Any, *, sync_backend: str) -> RoleActors:
    """Reserve each role's placement group (``cluster.timeouts.reserve_s``), start its actors and wait until every
    one has loaded its model (``start_s``)."""
    from euphonium_ray.actors.reward import ORMScorer, PRMScorer, ScorerPool
    from euphonium_ray.actors.rollout import RolloutWorker

    payload = cfg.model_dump(mode="json")
    bundles = role_bundles(cfg)
    roles = RoleActors([], [], [])
    try:
        timeouts = cfg.cluster.timeouts
        pgs = {role: _reserve(role, bundles[role], timeouts.reserve_s) for role in ("rollout", "prm", "orm")}
        roles.groups = [pg for pg in pgs.values() if pg is not None]
        for i, b in enumerate(bundles["prm"]):
            roles.prm.append(PRMScorer.options(**_options(pgs["prm"], i, b, cfg)).remote(
                payload, gpus=b.get("GPU", 0.0), cpus=b.get("CPU", 1.0)))
        for i, b in enumerate(bundles["orm"]):
            roles.orm.append(ORMScorer.options(**_options(pgs["orm"], i, b, cfg)).remote(
                payload, gpus=b.get("GPU", 0.0), cpus=b.get("CPU", 1.0)))
        prm_pool = ScorerPool(roles.prm, cfg.cluster.max_task_retries) if roles.prm else None
        orm_pool = ScorerPool(roles.orm, cfg.cluster.max_task_retries)
        n = cfg.cluster.num_rollout_workers
        for i, b in enumerate(bundles["rollout"]):
            roles.rollout.append(RolloutWorker.options(**_options(pgs["rollout"], i, b, cfg)).remote(
                payload, i, store, prm_pool=prm_pool, orm_pool=orm_pool, sync_backend=sync_backend,
                num_workers=n, gpus=b.get("GPU", 0.0), cpus=b.get("CPU", 1.0)))
        deadline = time.monotonic() + timeouts.start_s
        waits = [(role, i, a.ready.remote()) for role, actors in (("rollout", roles.rollout), ("PRM", roles.prm),
                                                                    ("ORM", roles.orm)) for i, a in enumerate(actors)]
        for role, i, ref in waits:
            try:
                ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))
            except ray.exceptions.RayActorError as exc:
                raise RoleStartError(f"{role} actor {i} could not start: {_last_error_line(exc)}") from None
    except BaseException:
        roles.shutdown(cfg.cluster.timeouts.shutdown_s)
        raise
    return roles
