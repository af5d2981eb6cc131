"""k8s/ renders offline with kustomize, and every rendered object is one an API server with KubeRay v1.7.0 would
accept: Ray kinds against the KubeRay CRD schemas (defaults first, unknown fields rejected, CEL rules), built-in
kinds with kubernetes-validate --strict, plus the project's rules; the run config's placement fits the groups.

There is no Kubernetes API server here, so scripts/validate_k8s.py does what its admission would.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from euphonium_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
CONFIG = REPO / "configs" / "hunyuan_kuberay.yaml"
SECRET_EXAMPLE = K8S / "examples" / "grafana-token.secret.yaml"
RAY_AUTH_EXAMPLE = K8S / "examples" / "ray-auth-token.secret.yaml"

_spec = importlib.util.spec_from_file_location("validate_k8s", REPO / "scripts" / "validate_k8s.py")
assert _spec and _spec.loader
vk = importlib.util.module_from_spec(_spec)
sys.modules["validate_k8s"] = vk
_spec.loader.exec_module(vk)


@pytest.fixture(scope="module")
def crds() -> dict[tuple[str, str], dict[str, Any]]:
    if not vk.CRD_DIR.is_dir():
        pytest.skip(
            f"the KubeRay v1.7.0 CRDs are read from {vk.CRD_DIR} (../shared/kuberay-crds beside the repository; "
            "never copied into the project) and that folder is absent on this machine; CI has it"
        )
    return vk.load_crd_schemas()


@pytest.fixture(scope="module")
def job_objs() -> list[dict[str, Any]]:
    return vk.render(K8S)


@pytest.fixture(scope="module")
def cluster_objs() -> list[dict[str, Any]]:
    return vk.render(K8S / "cluster")


def _one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [obj] = [o for o in objs if o["kind"] == kind]
    return obj


def _overlay(tmp_path: Path, patch_ops: list[dict[str, Any]], kind: str = "RayJob") -> list[dict[str, Any]]:
    """Render a user's kustomize overlay of k8s/ with a JSON patch, the way a real edit would reach the cluster."""
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [os.path.relpath(K8S, tmp_path)],
                "patches": [{"target": {"kind": kind}, "patch": yaml.safe_dump(patch_ops)}],
            }
        )
    )
    return vk.render(tmp_path)


ROLLOUT_GPU_LIMIT = (
    "/spec/rayClusterSpec/workerGroupSpecs/0/template/spec/containers/0/resources/limits/nvidia.com~1gpu"
)


# ------------------------------------------------------------------------------------------------ rendering
def test_kustomize_renders_the_training_job_and_the_standing_cluster_offline(
    job_objs: list[dict[str, Any]], cluster_objs: list[dict[str, Any]]
) -> None:
    policies = ["NetworkPolicy", "NetworkPolicy"]
    assert sorted(o["kind"] for o in job_objs) == ["Namespace", *policies, "PersistentVolumeClaim", "RayJob"]
    assert sorted(o["kind"] for o in cluster_objs) == ["Namespace", *policies, "PersistentVolumeClaim", "RayCluster"]
    for obj in job_objs + cluster_objs:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "euphonium"
    groups = [g["groupName"] for g in _one(cluster_objs, "RayCluster")["spec"]["workerGroupSpecs"]]
    assert groups == ["rollout", "reward", "learner"]


def test_rayjob_starts_exactly_the_standing_clusters_spec(
    job_objs: list[dict[str, Any]], cluster_objs: list[dict[str, Any]]
) -> None:
    job = _one(job_objs, "RayJob")
    assert job["spec"]["rayClusterSpec"] == _one(cluster_objs, "RayCluster")["spec"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["ttlSecondsAfterFinished"] > 0
    assert "euphonium-ray train --config /app/configs/hunyuan_kuberay.yaml" in job["spec"]["entrypoint"]


def test_every_pod_mounts_the_shared_volume_and_carries_the_label_the_network_policies_select(
    cluster_objs: list[dict[str, Any]],
) -> None:
    spec = _one(cluster_objs, "RayCluster")["spec"]
    pvc = _one(cluster_objs, "PersistentVolumeClaim")
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for template in templates:
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in template["spec"]["volumes"]}
        assert claims["shared"] == pvc["metadata"]["name"]
        assert {"name": "shared", "mountPath": "/shared"} in template["spec"]["containers"][0]["volumeMounts"]
        assert template["metadata"]["labels"]["app.kubernetes.io/part-of"] == "euphonium-ray"
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"


# ------------------------------------------------------------------------------------------------ validation
def test_every_rendered_object_validates(
    crds: dict[tuple[str, str], dict[str, Any]], job_objs: list[dict[str, Any]], cluster_objs: list[dict[str, Any]]
) -> None:
    assert ("ray.io/v1", "RayJob") in crds and ("ray.io/v1", "RayCluster") in crds
    assert vk.validate_objects(job_objs, crds) == []
    assert vk.validate_objects(cluster_objs, crds) == []


def test_kubernetes_validate_cli_strict_accepts_the_builtin_kinds(
    tmp_path: Path, job_objs: list[dict[str, Any]]
) -> None:
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(job_objs))
    cli = Path(sys.executable).parent / "kubernetes-validate"
    out = subprocess.run([str(cli), "--strict", str(rendered), str(SECRET_EXAMPLE), str(RAY_AUTH_EXAMPLE)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "passed for resource namespace/euphonium" in out.stdout
    assert "passed for resource persistentvolumeclaim/euphonium-shared" in out.stdout
    assert "passed for resource networkpolicy/euphonium-ray-nodes" in out.stdout
    assert "passed for resource networkpolicy/euphonium-ray-head-dashboard" in out.stdout
    assert "passed for resource secret/euphonium-grafana" in out.stdout
    assert "passed for resource secret/euphonium-ray-auth" in out.stdout
    # the CLI only warns on CRD kinds; that is why RayJob/RayCluster go through the CRD schemas above
    assert "WARN" in out.stdout and "RayJob" in out.stdout


def test_the_grafana_and_ray_token_secrets_are_examples_outside_the_kustomization(
    job_objs: list[dict[str, Any]], cluster_objs: list[dict[str, Any]]
) -> None:
    for example, key in ((SECRET_EXAMPLE, "token"), (RAY_AUTH_EXAMPLE, "auth_token")):
        secret = yaml.safe_load(example.read_text())
        assert vk.validate_builtin(secret) == []
        assert secret["stringData"][key].startswith("REPLACE")
    assert all(o["kind"] != "Secret" for o in job_objs + cluster_objs)


def test_schema_defaults_are_applied_before_validation(
    crds: dict[tuple[str, str], dict[str, Any]], cluster_objs: list[dict[str, Any]]
) -> None:
    cluster = copy.deepcopy(_one(cluster_objs, "RayCluster"))
    for group in cluster["spec"]["workerGroupSpecs"]:  # required, but defaulted by the schema (0 and 2^31-1)
        del group["minReplicas"], group["maxReplicas"]
        group["replicas"] = 0
    schema = crds[("ray.io/v1", "RayCluster")]
    raw = jsonschema.Draft7Validator(vk.strict_schema(schema))
    assert any("'minReplicas' is a required property" in e.message for e in raw.iter_errors(cluster))
    assert vk.validate_custom(cluster, crds) == []


# ------------------------------------------------------------------------------------------ negative cases
def test_validator_rejects_a_rollout_worker_group_without_gpus(
    crds: dict[tuple[str, str], dict[str, Any]], tmp_path: Path
) -> None:
    objs = _overlay(tmp_path, [{"op": "remove", "path": ROLLOUT_GPU_LIMIT},
                               {"op": "remove", "path": ROLLOUT_GPU_LIMIT.replace("limits", "requests")}])
    errors = vk.validate_objects(objs, crds)
    assert errors == [
        "RayJob/euphonium-train worker group 'rollout': has no GPUs "
        "(set resources.limits['nvidia.com/gpu'] on its Ray container)"
    ]


def test_validator_rejects_a_misspelled_field(crds: dict[tuple[str, str], dict[str, Any]], tmp_path: Path) -> None:
    objs = _overlay(tmp_path, [{"op": "add", "path": "/spec/rayClusterSpec/workerGroupSpecs/1/replcas", "value": 2}])
    [error] = vk.validate_objects(objs, crds)
    assert ".spec.rayClusterSpec.workerGroupSpecs[1]" in error and "'replcas' was unexpected" in error


def test_validator_rejects_a_misspelled_field_of_a_builtin_kind(
    crds: dict[tuple[str, str], dict[str, Any]], job_objs: list[dict[str, Any]]
) -> None:
    pvc = copy.deepcopy(_one(job_objs, "PersistentVolumeClaim"))
    pvc["spec"]["acessModes"] = pvc["spec"].pop("accessModes")
    [error] = vk.validate_objects([pvc], crds)
    assert "'acessModes' was unexpected" in error


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("/spec/deletionStrategy", {"onSuccess": {"policy": "DeleteCluster"}}, "requires either BOTH onSuccess"),
        ("/spec/managedBy", "someone-else", "the managedBy field value must be either"),
        ("/spec/rayClusterSpec/workerGroupSpecs/0/replicas", "two", "'two' is not of type 'integer'"),
        ("/spec/rayClusterSpec/headGroupSpec/serviceType", "LoadBalancer", "must be ClusterIP only"),
        ("/spec/shutdownAfterJobFinishes", False, "shutdownAfterJobFinishes must be true"),
    ],
    ids=["cel-deletion-strategy", "cel-managed-by", "wrong-type", "public-dashboard", "no-shutdown"],
)
def test_validator_rejects_broken_rules(
    crds: dict[tuple[str, str], dict[str, Any]], job_objs: list[dict[str, Any]], path: str, value: Any, message: str
) -> None:
    job = copy.deepcopy(_one(job_objs, "RayJob"))
    *parents, leaf = [int(p) if p.isdigit() else p for p in path.strip("/").split("/")]
    node: Any = job
    for part in parents:
        node = node[part]
    node[leaf] = value
    errors = vk.validate_objects([job], crds)
    assert len(errors) >= 1 and any(message in e for e in errors), errors


def test_duplicate_container_names_break_the_list_map_keys(
    crds: dict[tuple[str, str], dict[str, Any]], job_objs: list[dict[str, Any]]
) -> None:
    job = copy.deepcopy(_one(job_objs, "RayJob"))
    containers = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    containers.append(copy.deepcopy(containers[0]))
    assert any("duplicate entries with {'name': 'ray-head'}" in e for e in vk.validate_objects([job], crds))


# ------------------------------------------------------------------------------------------------ placement
def _group_resources(spec: dict[str, Any]) -> dict[str, dict[str, float]]:
    """groupName -> rayStartParams.resources, parsed here independently of the validator."""
    out = {}
    for group in spec["workerGroupSpecs"]:
        raw = group["rayStartParams"].get("resources", "{}")
        out[group["groupName"]] = json.loads(raw.strip("'\"").replace('\\"', '"'))
    return out


def test_config_custom_resources_exist_in_the_worker_groups_ray_start_params(
    cluster_objs: list[dict[str, Any]],
) -> None:
    cfg = load_config(CONFIG, use_env=False)
    advertised = _group_resources(_one(cluster_objs, "RayCluster")["spec"])
    assert set(cfg.cluster.resources) == {"rollout", "prm", "orm", "learner"}
    for role, wanted in cfg.cluster.resources.items():
        for name in wanted:
            assert any(name in res for res in advertised.values()), f"{role}: {name} is advertised by no group"
    expected_group = {"rollout": "rollout", "prm": "reward", "orm": "reward", "learner": "learner"}
    for role, group in expected_group.items():
        assert set(cfg.cluster.resources[role]) <= set(advertised[group])


def test_config_placement_fits_the_groups_gpus_and_custom_resources(cluster_objs: list[dict[str, Any]]) -> None:
    spec = _one(cluster_objs, "RayCluster")["spec"]
    assert vk.placement_errors(load_config(CONFIG, use_env=False), spec) == []
    # 17 rollout workers of 1 GPU do not fit 2 pods of 8 GPUs
    over = load_config(CONFIG, ["cluster.num_rollout_workers=17"], use_env=False)
    assert "worker group rollout: the config needs GPU=17 but the group offers 16" in vk.placement_errors(over, spec)
    typo = load_config(CONFIG, ["cluster.resources.learner={euphonium_lerner: 1}"], use_env=False)
    assert any("['euphonium_lerner'] are advertised by no worker group" in e for e in vk.placement_errors(typo, spec))


def test_deploy_doc_placement_table_matches_the_config_and_groups(cluster_objs: list[dict[str, Any]]) -> None:
    cfg = load_config(CONFIG, use_env=False)
    advertised = _group_resources(_one(cluster_objs, "RayCluster")["spec"])
    doc = (REPO / "docs" / "deploy.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| `(\w+)` \| `(\w+)`: ([\d.]+) \|", doc, flags=re.M)
    assert {r[0] for r in rows} == set(cfg.cluster.resources)
    for role, group, resource, amount in rows:
        assert cfg.cluster.resources[role] == {resource: float(amount)}
        assert resource in advertised[group]


def test_validate_script_exits_zero_on_the_repository(crds: dict[tuple[str, str], dict[str, Any]]) -> None:
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "validate_k8s.py")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("OK") == 2
