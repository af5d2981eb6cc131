"""Who can reach a rendered Euphonium-Ray deployment and run code on it (part of scripts/validate_k8s.py).

Ray runs whatever a client that reaches its ports sends (`ray job submit` is arbitrary code on the GPU nodes), so
the rendered manifests must hold three locks, checked here without an API server:
- Ray token authentication for every cluster spec (``authOptions.mode: token`` with a named Secret). KubeRay v1.7.0
  then injects ``RAY_AUTH_MODE``/``RAY_AUTH_TOKEN`` into the Ray container of each pod, the wait-gcs-ready init
  containers and the RayJob submitter, but keeps a value a container already sets, so none may set another;
- no Secret but the Ray token reaches a Ray pod (the Grafana token in the head's environment was readable by every
  job); Grafana URLs are https, since a token travels to them;
- NetworkPolicies, evaluated as an enforcing CNI would: the deployment's Ray pods reach each other on any port; the
  job submitter reaches the head's dashboard port only; a pod outside the deployment, in this namespace or another,
  reaches no Ray port; and a rule that admits anyone outside the deployment names the dashboard or metrics port.
Pod labels are those of the templates plus the ones KubeRay v1.7.0 adds (``ray.io/is-ray-node``,
``ray.io/node-type``, ...; ray-operator/controllers/ray/common/pod.go, labelPod).
"""

from __future__ import annotations

import ipaddress
from typing import Any, Iterator

import yaml

AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")
TOKEN_KEY = "auth_token"  # KubeRay's RAY_AUTH_TOKEN_SECRET_KEY
GRAFANA_URL_ENV = ("GRAFANA_URL", "RAY_GRAFANA_HOST")
HEAD_PORTS = (6379, 8265, 10001, 8080, 52365, 10002)  # GCS, dashboard/jobs, client, metrics, agent, a worker port
WORKER_PORTS = (8080, 52365, 10002, 20000)
OUTSIDE_PORTS = {8265, 8080}  # what a peer outside the deployment may be let in on: jobs API, metrics
Obj = dict[str, Any]


# ----------------------------------------------------------------------------------------------- pods
def ray_pods(kind: str, name: str, spec: Obj) -> Iterator[tuple[str, Obj, dict[str, str]]]:
    """(where, pod template, labels the running pod carries) for the head and every worker group."""
    base = {"ray.io/is-ray-node": "yes", "ray.io/cluster": name, "app.kubernetes.io/name": "kuberay",
            "app.kubernetes.io/created-by": "kuberay-operator"}
    head = spec.get("headGroupSpec", {}).get("template", {})
    yield (f"{kind}/{name} head", head, {**base, **_labels(head), "ray.io/node-type": "head",
                                         "ray.io/group": "headgroup"})
    for group in spec.get("workerGroupSpecs", []):
        template = group.get("template", {})
        yield (f"{kind}/{name} worker group {group.get('groupName')!r}", template,
               {**base, **_labels(template), "ray.io/node-type": "worker", "ray.io/group": group.get("groupName", "")})


def _labels(template: Obj) -> dict[str, str]:
    return {k: str(v) for k, v in (template.get("metadata", {}).get("labels") or {}).items()}


def _containers(template: Obj) -> list[Obj]:
    pod = template.get("spec", {})
    return list(pod.get("initContainers") or []) + list(pod.get("containers") or [])


def _secret_refs(template: Obj) -> Iterator[tuple[str, str]]:
    """(Secret name, how it is referenced) for every Secret a pod template can read."""
    for c in _containers(template):
        for env in c.get("env") or []:
            ref = (env.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                yield ref.get("name", ""), f"env {env.get('name')} of container {c.get('name')}"
        for source in c.get("envFrom") or []:
            if source.get("secretRef"):
                yield source["secretRef"].get("name", ""), f"envFrom of container {c.get('name')}"
    for volume in template.get("spec", {}).get("volumes") or []:
        if volume.get("secret"):
            yield volume["secret"].get("secretName", ""), f"volume {volume.get('name')}"
        for source in (volume.get("projected") or {}).get("sources") or []:
            if source.get("secret"):
                yield source["secret"].get("name", ""), f"projected volume {volume.get('name')}"


# ------------------------------------------------------------------------------------------ auth, secrets
def auth_errors(where: str, spec: Obj, submitter: Obj | None, runtime_env: str) -> list[str]:
    """Token auth on, from a named Secret, and nothing that overrides or bypasses it."""
    auth = spec.get("authOptions") or {}
    secret = auth.get("secretName") or ""
    errors = []
    if auth.get("mode") != "token":
        errors.append(f"{where}: Ray token authentication is off (authOptions.mode is {auth.get('mode')!r}, "
                      "must be 'token'): anyone who reaches the head can submit code")
    elif not secret:
        errors.append(f"{where}: authOptions.secretName is not set: name the Secret (key {TOKEN_KEY}) you create, "
                      "so the submitter and your own `ray job` clients can read the token")
    templates = [(w, t) for w, t, _ in ray_pods(*where.split("/", 1), spec)]
    if submitter is not None:
        templates.append((f"{where} submitter", submitter))
    for place, template in templates:
        for c in _containers(template):
            env = {e.get("name"): e for e in c.get("env") or []}
            mode = env.get("RAY_AUTH_MODE")
            if mode is not None and mode.get("value") != "token":
                errors.append(f"{place}: container {c.get('name')} sets RAY_AUTH_MODE={mode.get('value')!r}; "
                              "KubeRay keeps a value a container sets, so this turns authentication off there")
            token = env.get("RAY_AUTH_TOKEN")
            ref = ((token or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
            if token is not None and (ref.get("name") != secret or ref.get("key") != TOKEN_KEY):
                errors.append(f"{place}: container {c.get('name')} sets RAY_AUTH_TOKEN other than from Secret "
                              f"{secret!r} key {TOKEN_KEY} (a literal token in a manifest, or another cluster's)")
        for name, how in _secret_refs(template):
            if name != secret and not (place.endswith("submitter") and _in_init_container(template, how)):
                errors.append(f"{place}: reads Secret {name!r} ({how}); a Ray process, so every job on the "
                              "cluster, could read it (give it to a step outside Ray, as the submitter's "
                              "init container does for the Grafana token)")
    env_vars = ((yaml.safe_load(runtime_env or "") or {}).get("env_vars") or {})
    for name in sorted(set(env_vars) & {*AUTH_ENV, "GRAFANA_TOKEN"}):
        errors.append(f"{where}: runtimeEnvYAML sets {name}; it reaches every Ray worker of the job")
    return errors


def _in_init_container(template: Obj, how: str) -> bool:
    names = {c.get("name") for c in template.get("spec", {}).get("initContainers") or []}
    return any(how.endswith(f"container {n}") for n in names)


def url_errors(objs: list[Obj]) -> list[str]:
    """Every Grafana URL in any container of any object is https (a service-account token is sent to it)."""
    errors = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if node.get("name") in GRAFANA_URL_ENV and isinstance(node.get("value"), str):
                if not node["value"].startswith("https://"):
                    errors.append(f"{where}: {node['name']}={node['value']!r} is not https; the Grafana token "
                                  "would cross the network in clear text")
            for value in node.values():
                walk(value, where)
        elif isinstance(node, list):
            for value in node:
                walk(value, where)

    for obj in objs:
        walk(obj, f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}")
    return errors


# -------------------------------------------------------------------------------------------- policies
def _selects(selector: Obj | None, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions); {} selects everything."""
    selector = selector or {}
    if any(labels.get(k) != str(v) for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), [str(v) for v in expr.get("values") or []]
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}.get(op, False)
        if not ok:
            return False
    return True


def _peer_matches(entry: Obj, peer: Obj, policy_namespace: str) -> bool:
    if "ipBlock" in entry:
        if peer.get("ip") is None:
            return False
        block = entry["ipBlock"]
        ip = ipaddress.ip_address(peer["ip"])
        return ip in ipaddress.ip_network(block["cidr"]) and not any(
            ip in ipaddress.ip_network(e) for e in block.get("except") or [])
    if "namespaceSelector" in entry:
        if not _selects(entry["namespaceSelector"], peer["namespace_labels"]):
            return False
    elif peer["namespace"] != policy_namespace:
        return False
    return _selects(entry.get("podSelector"), peer["labels"]) if "podSelector" in entry else True


def _port_matches(ports: list[Obj] | None, port: int, named: dict[str, int]) -> bool:
    if not ports:
        return True
    for entry in ports:
        if entry.get("protocol", "TCP") != "TCP":
            continue
        want = entry.get("port")
        if want is None:
            return True
        low = named.get(want) if isinstance(want, str) else int(want)
        if low is not None and low <= port <= int(entry.get("endPort", low)):
            return True
    return False


def ingress_allowed(policies: list[Obj], namespace: str, target: dict[str, str], named_ports: dict[str, int],
                    peer: Obj, port: int) -> bool:
    """Whether ``peer`` (namespace, namespace_labels, labels, optional ip) reaches TCP ``port`` of a pod with
    labels ``target`` in ``namespace``: open when no policy selects the pod, else only what a rule admits."""
    selecting = [p for p in policies if p["metadata"].get("namespace", namespace) == namespace
                 and "Ingress" in (p["spec"].get("policyTypes") or ["Ingress"])
                 and _selects(p["spec"].get("podSelector"), target)]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or []:
            sources = rule.get("from")
            if _port_matches(rule.get("ports"), port, named_ports) and (
                    not sources or any(_peer_matches(e, peer, namespace) for e in sources)):
                return True
    return False


def _peer(namespace: str, labels: dict[str, str], ip: str | None = None) -> Obj:
    return {"namespace": namespace, "namespace_labels": {"kubernetes.io/metadata.name": namespace},
            "labels": labels, "ip": ip}


def network_errors(where: str, namespace: str, spec: Obj, submitter: Obj | None, policies: list[Obj]) -> list[str]:
    """The reachability rules of the module docstring, on sample peers, plus the port rule on every policy."""
    errors = []
    pods = list(ray_pods(*where.split("/", 1), spec))
    strangers = {f"a pod in namespace {namespace!r} outside the deployment": _peer(namespace, {"app": "other"}),
                 "a pod in another namespace": _peer("default", {"app": "other"}),
                 "an address outside the cluster": _peer("", {}, ip="203.0.113.7")}
    _, _, head_labels = pods[0]
    member = _peer(namespace, pods[-1][2])  # a worker of this cluster
    for place, template, labels in pods:
        named = {p["name"]: int(p["containerPort"]) for c in _containers(template) for p in c.get("ports") or []
                 if "name" in p}
        ports = HEAD_PORTS if labels["ray.io/node-type"] == "head" else WORKER_PORTS
        for who, peer in strangers.items():
            open_ports = [p for p in ports if ingress_allowed(policies, namespace, labels, named, peer, p)]
            if open_ports:
                errors.append(f"{place}: {who} reaches ports {open_ports} (no NetworkPolicy keeps it out)")
        if not all(ingress_allowed(policies, namespace, labels, named, member, p) for p in ports):
            errors.append(f"{place}: the cluster's own pods cannot reach all of its ports (Ray needs them)")
    if submitter is not None:
        sub = _peer(namespace, _labels(submitter))
        if not ingress_allowed(policies, namespace, head_labels, {}, sub, 8265):
            errors.append(f"{where} submitter: cannot reach the head's dashboard port 8265 (`ray job submit`)")
        wide = [p for p in (6379, 10001, 52365) if ingress_allowed(policies, namespace, head_labels, {}, sub, p)]
        if wide:
            errors.append(f"{where} submitter: reaches head ports {wide}; it needs the dashboard port 8265 only")
    return errors


def policy_port_errors(policies: list[Obj]) -> list[str]:
    """A rule admitting peers outside the deployment (another namespace, an IP block, pods not labelled as its
    Ray pods) must name ports, and only the dashboard and metrics ports."""
    errors = []
    for policy in policies:
        for i, rule in enumerate(policy["spec"].get("ingress") or []):
            outsiders = not rule.get("from") or any(
                "podSelector" not in e or "namespaceSelector" in e or "ipBlock" in e
                or not {"app.kubernetes.io/part-of", "ray.io/is-ray-node"} <= set(
                    (e["podSelector"] or {}).get("matchLabels") or {})
                for e in rule.get("from") or [])
            submitter_only = rule.get("from") and all(
                ((e.get("podSelector") or {}).get("matchLabels") or {}).get("app.kubernetes.io/component")
                == "ray-job-submitter" and "namespaceSelector" not in e for e in rule["from"])
            ports = {p.get("port") for p in rule.get("ports") or []}
            if outsiders and not submitter_only and (not ports or not ports <= OUTSIDE_PORTS
                                                     or any("endPort" in p for p in rule.get("ports") or [])):
                errors.append(f"NetworkPolicy/{policy['metadata'].get('name')} ingress rule {i}: admits peers "
                              f"outside the deployment on ports {sorted(ports, key=str) or 'all'}; allow them "
                              f"only {sorted(OUTSIDE_PORTS)} (jobs API, metrics)")
    return errors


def access_errors(objs: list[Obj]) -> list[str]:
    """All of the above for one rendered kustomization."""
    policies = [o for o in objs if o.get("kind") == "NetworkPolicy"]
    errors = url_errors(objs) + policy_port_errors(policies)
    for obj in objs:
        kind, name = obj.get("kind"), obj.get("metadata", {}).get("name")
        namespace = obj.get("metadata", {}).get("namespace", "default")
        if kind == "RayCluster":
            spec, submitter, runtime_env = obj.get("spec", {}), None, ""
        elif kind == "RayJob" and "rayClusterSpec" in obj.get("spec", {}):
            spec, runtime_env = obj["spec"]["rayClusterSpec"], obj["spec"].get("runtimeEnvYAML", "")
            submitter = obj["spec"].get("submitterPodTemplate") or {"spec": {"containers": [{"name": "default"}]}}
        else:
            continue
        errors += auth_errors(f"{kind}/{name}", spec, submitter, runtime_env)
        errors += network_errors(f"{kind}/{name}", namespace, spec, submitter, policies)
    return errors
