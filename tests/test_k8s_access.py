"""Who can reach the KubeRay deployment: Ray token auth from a Secret for head, workers and submitter; the Grafana
token only in the step that pushes the dashboard; NetworkPolicies that let only the deployment's own pods and the
job submitter reach Ray's ports. Checked on what `kubectl kustomize k8s/` renders (there is no API server here),
with the NetworkPolicy semantics of scripts/k8s_access.py pinned by their own cases first."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from test_k8s_manifests import RAY_AUTH_EXAMPLE, _one, _overlay, cluster_objs, crds, job_objs, vk  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import k8s_access as ka  # noqa: E402

NS = "euphonium"
RAY = {"app.kubernetes.io/part-of": "euphonium-ray", "ray.io/is-ray-node": "yes"}
HEAD = {**RAY, "ray.io/node-type": "head"}
WORKER = {**RAY, "ray.io/node-type": "worker"}
SUBMITTER = {"app.kubernetes.io/part-of": "euphonium-ray", "app.kubernetes.io/component": "ray-job-submitter"}


def _policy(spec: dict[str, Any], name: str = "p") -> dict[str, Any]:
    return {"kind": "NetworkPolicy", "metadata": {"name": name, "namespace": NS}, "spec": spec}


def _allowed(policies, target, peer_labels, port, namespace=NS, named=None) -> bool:
    return ka.ingress_allowed(policies, NS, target, named or {}, ka._peer(namespace, peer_labels), port)


# ------------------------------------------------------------------------------ the evaluator's semantics
def test_network_policy_evaluator_follows_kubernetes_semantics() -> None:
    only_ray = _policy({"podSelector": {"matchLabels": RAY},
                        "ingress": [{"from": [{"podSelector": {"matchLabels": RAY}}]}]})
    # a pod no policy selects is open; a selected one only to what a rule admits
    assert _allowed([only_ray], {"app": "web"}, {"app": "x"}, 80)
    assert not _allowed([only_ray], HEAD, {"app": "x"}, 6379) and _allowed([only_ray], HEAD, WORKER, 6379)
    # a podSelector alone means this namespace only
    assert not _allowed([only_ray], HEAD, WORKER, 6379, namespace="other")
    # namespaceSelector and podSelector in one entry: both must hold; in two entries: either
    both = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ops"}},
            "podSelector": {"matchLabels": {"app": "op"}}}
    one_entry = _policy({"podSelector": {}, "ingress": [{"from": [both]}]})
    assert _allowed([one_entry], HEAD, {"app": "op"}, 1, namespace="ops")
    assert not _allowed([one_entry], HEAD, {"app": "x"}, 1, namespace="ops")
    two_entries = _policy({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": both["namespaceSelector"]},
                                                                     {"podSelector": both["podSelector"]}]}]})
    assert _allowed([two_entries], HEAD, {"app": "x"}, 1, namespace="ops")
    # ports: named, ranges, other protocols; no ports means all; an empty rule admits everyone
    ports = _policy({"podSelector": {}, "ingress": [{"ports": [{"port": "dashboard"}, {"port": 10002, "endPort": 10005},
                                                              {"port": 53, "protocol": "UDP"}]}]})
    named = {"dashboard": 8265}
    assert [p for p in (8265, 10001, 10003, 53) if _allowed([ports], HEAD, {}, p, named=named)] == [8265, 10003]
    assert _allowed([_policy({"podSelector": {}, "ingress": [{}]})], HEAD, {"app": "x"}, 1, namespace="other")
    # matchExpressions; an Egress-only policy leaves ingress open
    expr = _policy({"podSelector": {"matchExpressions": [{"key": "ray.io/node-type", "operator": "In",
                                                          "values": ["head"]}]}, "ingress": []})
    assert not _allowed([expr], HEAD, WORKER, 1) and _allowed([expr], WORKER, WORKER, 1)
    assert _allowed([_policy({"podSelector": {}, "policyTypes": ["Egress"]})], HEAD, {"app": "x"}, 1)


# ----------------------------------------------------------------------------------------- the manifests
def test_ray_token_auth_is_on_from_a_named_secret_for_the_cluster_the_job_and_the_submitter(
    job_objs, cluster_objs
) -> None:
    secret = yaml.safe_load(RAY_AUTH_EXAMPLE.read_text())
    expected = {"mode": "token", "secretName": secret["metadata"]["name"]}
    job = _one(job_objs, "RayJob")
    assert _one(cluster_objs, "RayCluster")["spec"]["authOptions"] == expected
    assert job["spec"]["rayClusterSpec"]["authOptions"] == expected
    assert set(secret["stringData"]) == {ka.TOKEN_KEY}  # the key KubeRay v1.7.0 reads (RAY_AUTH_TOKEN_SECRET_KEY)
    # KubeRay injects the token into the submitter's first container unless it already sets the variables
    submitter = job["spec"]["submitterPodTemplate"]
    [container] = submitter["spec"]["containers"]
    assert container["name"] == "ray-job-submitter" and "command" not in container
    assert not {e["name"] for e in container.get("env", [])} & set(ka.AUTH_ENV)
    assert submitter["metadata"]["labels"] == SUBMITTER


def test_the_grafana_token_reaches_only_the_init_container_that_pushes_the_dashboard(job_objs, cluster_objs) -> None:
    found = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if node.get("name") == "euphonium-grafana" or node.get("name") == "GRAFANA_TOKEN":
                found.append(path)
            for key, value in node.items():
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")

    for obj in job_objs + cluster_objs:
        walk(obj, f"{obj['kind']}")
    assert found == ["RayJob.spec.submitterPodTemplate.spec.initContainers[0].env[0]",
                     "RayJob.spec.submitterPodTemplate.spec.initContainers[0].env[0].valueFrom.secretKeyRef"]
    job = _one(job_objs, "RayJob")
    assert "GRAFANA" not in job["spec"]["entrypoint"] and "GRAFANA" not in job["spec"]["runtimeEnvYAML"]
    [push] = job["spec"]["submitterPodTemplate"]["spec"]["initContainers"]
    assert "euphonium-ray dashboards push" in push["args"][0]
    urls = [e["value"] for o in job_objs + cluster_objs for e in _envs(o) if e["name"] in ka.GRAFANA_URL_ENV]
    assert urls and all(u.startswith("https://") for u in urls)


def _envs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            out.extend(e for e in node.get("env", []) if isinstance(e, dict) and "value" in e)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(obj)
    return out


def test_network_policies_let_only_the_clusters_pods_and_the_submitter_reach_the_head(job_objs) -> None:
    policies = [o for o in job_objs if o["kind"] == "NetworkPolicy"]
    ports = {"gcs": 6379, "dashboard": 8265, "client": 10001, "metrics": 8080, "agent": 52365}
    reach = {
        who: sorted(name for name, port in ports.items() if _allowed(policies, HEAD, labels, port, namespace=ns))
        for who, (ns, labels) in {
            "a worker of the cluster": (NS, WORKER),
            "the job submitter": (NS, SUBMITTER),
            "another pod of the namespace": (NS, {"app": "notebook"}),
            "a pod that claims part-of only": (NS, {"app.kubernetes.io/part-of": "euphonium-ray"}),
            "a pod of another namespace": ("default", {"app": "notebook"}),
            "the KubeRay operator (placeholder namespace)": ("kuberay-system",
                                                             {"app.kubernetes.io/name": "kuberay-operator"}),
            "Prometheus (placeholder namespace)": ("monitoring", {"app": "prometheus"}),
        }.items()
    }
    assert reach == {
        "a worker of the cluster": ["agent", "client", "dashboard", "gcs", "metrics"],
        "the job submitter": ["dashboard"],
        "another pod of the namespace": [],
        "a pod that claims part-of only": [],
        "a pod of another namespace": [],
        "the KubeRay operator (placeholder namespace)": ["dashboard"],
        "Prometheus (placeholder namespace)": ["metrics"],
    }
    # workers: the cluster's own pods on any port, Prometheus on the metrics port, nobody else
    assert _allowed(policies, WORKER, HEAD, 23456) and not _allowed(policies, WORKER, SUBMITTER, 10002)
    assert not _allowed(policies, WORKER, {"app": "notebook"}, 8080, namespace="default")


# ------------------------------------------------------------------------------------------ negative cases
ENV0 = "/spec/rayClusterSpec/workerGroupSpecs/0/template/spec/containers/0/env/-"


@pytest.mark.parametrize(
    "ops, message",
    [
        ([{"op": "add", "path": ENV0, "value": {"name": "RAY_AUTH_MODE", "value": "disabled"}}],
         "RayJob/euphonium-train worker group 'rollout': container ray-worker sets RAY_AUTH_MODE='disabled'; KubeRay "
         "keeps a value a container sets, so this turns authentication off there"),
        ([{"op": "replace", "path": "/spec/rayClusterSpec/authOptions/mode", "value": "disabled"}],
         "RayJob/euphonium-train: Ray token authentication is off (authOptions.mode is 'disabled', must be 'token')"),
        ([{"op": "remove", "path": "/spec/rayClusterSpec/authOptions/secretName"}],
         "RayJob/euphonium-train: authOptions.secretName is not set"),
        ([{"op": "add", "path": "/spec/rayClusterSpec/headGroupSpec/template/spec/containers/0/env/-",
           "value": {"name": "GRAFANA_TOKEN", "valueFrom": {"secretKeyRef": {"name": "euphonium-grafana",
                                                                             "key": "token"}}}}],
         "RayJob/euphonium-train head: reads Secret 'euphonium-grafana' (env GRAFANA_TOKEN of container ray-head); "
         "a Ray process, so every job on the cluster, could read it"),
        ([{"op": "add", "path": ENV0, "value": {"name": "RAY_AUTH_TOKEN", "value": "hunter2"}}],
         "container ray-worker sets RAY_AUTH_TOKEN other than from Secret 'euphonium-ray-auth' key auth_token"),
        ([{"op": "replace", "path": "/spec/runtimeEnvYAML", "value": "env_vars:\n  RAY_AUTH_MODE: disabled\n"}],
         "RayJob/euphonium-train: runtimeEnvYAML sets RAY_AUTH_MODE; it reaches every Ray worker of the job"),
        ([{"op": "replace", "path": "/spec/submitterPodTemplate/spec/initContainers/0/env/1/value",
           "value": "http://grafana.monitoring.svc:3000"}],
         "RayJob/euphonium-train: GRAFANA_URL='http://grafana.monitoring.svc:3000' is not https"),
        ([{"op": "remove", "path": "/spec/submitterPodTemplate/metadata/labels/app.kubernetes.io~1component"}],
         "RayJob/euphonium-train submitter: cannot reach the head's dashboard port 8265"),
    ],
    ids=["worker-auth-disabled", "auth-off", "no-secret-name", "grafana-token-on-head", "literal-token",
         "runtime-env-auth", "http-grafana", "unlabelled-submitter"],
)
def test_validator_rejects_a_manifest_that_opens_the_cluster(crds, tmp_path, ops, message) -> None:
    errors = vk.validate_objects(_overlay(tmp_path, ops), crds)
    assert any(message in e for e in errors), errors


@pytest.mark.parametrize(
    "rule, messages",
    [
        ({}, ["RayJob/euphonium-train head: a pod in namespace 'euphonium' outside the deployment reaches ports "
              "[6379, 8265, 10001, 8080, 52365, 10002]",
              "NetworkPolicy/euphonium-ray-nodes ingress rule 2: admits peers outside the deployment on ports all"]),
        ({"from": [{"namespaceSelector": {}}], "ports": [{"port": 6379}]},
         ["RayJob/euphonium-train head: a pod in another namespace reaches ports [6379]",
          "NetworkPolicy/euphonium-ray-nodes ingress rule 2: admits peers outside the deployment on ports [6379]"]),
        ({"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"port": 8265}]},
         ["RayJob/euphonium-train head: an address outside the cluster reaches ports [8265]"]),
    ],
    ids=["allow-all", "other-namespaces-to-gcs", "internet-to-dashboard"],
)
def test_validator_rejects_a_network_policy_rule_that_lets_strangers_in(crds, job_objs, rule, messages) -> None:
    objs = copy.deepcopy(job_objs)
    nodes = next(o for o in objs if o["metadata"]["name"] == "euphonium-ray-nodes")
    nodes["spec"]["ingress"].append(rule)
    errors = vk.validate_objects(objs, crds)
    for message in messages:
        assert any(message in e for e in errors), errors
