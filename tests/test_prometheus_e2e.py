"""A toy training submitted to a real Ray head with `ray job submit` shows up in a real Prometheus server, and the
Grafana dashboard reads only series that run exported.

The slow test starts everything itself on 127.0.0.1 (run it in a loopback-only network namespace:
scripts/loopback.sh), with free ports and its own Ray temp dir, and stops exactly the processes it started.
Prometheus is Debian's package (`apt-get install -y prometheus`), started as a plain binary, not as a service.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest
import yaml

from euphonium_ray import dashboards

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
PROMETHEUS_INSTALL = "apt-get update && apt-get install -y prometheus"
TRAIN_STEPS = 2
# Ray exports a counter only after its first increment (Counter.inc(0) raises), and a clean run drops no sample,
# so this panel's series cannot appear here; its name comes from the same catalog rule as the series that do.
ONLY_WHEN_SAMPLES_ARE_DROPPED = {"ray_euphonium_skipped_samples_total"}


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not installed; the metrics tests need Debian's Prometheus: {PROMETHEUS_INSTALL}")
    return path


# ------------------------------------------------------------------------------------------ fast checks
def test_prometheus_config_is_valid_and_scrapes_rays_service_discovery_file() -> None:
    from ray._private import ray_constants

    out = subprocess.run([_binary("promtool"), "check", "config", str(REPO / "deploy" / "prometheus.yml")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    config = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    [job] = config["scrape_configs"]
    [sd] = job["file_sd_configs"]
    assert sd["files"] == [f"/tmp/ray/{ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE}"]


def test_pip_runtime_env_installs_pyprojects_dependencies_except_ray() -> None:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pip_env = yaml.safe_load((REPO / "deploy" / "runtime_env.pip.yaml").read_text())
    assert pip_env["pip"] == [d for d in deps if not d.startswith("ray")], (
        "deploy/runtime_env.pip.yaml's pip list is out of date with pyproject.toml's dependencies (minus ray)"
    )
    plain = yaml.safe_load((REPO / "deploy" / "runtime_env.yaml").read_text())
    assert "pip" not in plain and plain["env_vars"] == pip_env["env_vars"]
    assert plain["excludes"] == pip_env["excludes"] and ".venv*" in plain["excludes"]


@pytest.mark.parametrize(
    "args, message",
    [([], "no training arguments"), (["--address", "127.0.0.1:8265", "--", "--config", "x"], "is not the http(s) URL"),
     (["--bogus"], "unknown option --bogus")],
)
def test_submit_script_rejects_bad_arguments_before_calling_ray(args: list[str], message: str) -> None:
    out = subprocess.run(["bash", str(REPO / "deploy" / "submit.sh"), *args], capture_output=True, text=True)
    assert out.returncode == 2 and message in out.stderr


# ------------------------------------------------------------------------------------------ helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - our own servers on 127.0.0.1
        return json.loads(resp.read())


def wait_for(what: str, probe: Any, timeout: float, interval: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
            if last:
                return last
        except OSError as exc:  # not listening yet
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def stop_tree(proc: subprocess.Popen[bytes], marker: str | None = None) -> None:
    """Stop a process we started and every process under it (found by pid, and by our unique temp dir in the
    command line for daemons that were re-parented); never by a program name."""
    procs: dict[int, psutil.Process] = {}
    try:
        root = psutil.Process(proc.pid)
        procs[root.pid] = root
        procs.update({p.pid: p for p in root.children(recursive=True)})
    except psutil.NoSuchProcess:
        pass
    if marker:
        for p in psutil.process_iter(["pid", "cmdline"]):
            if any(marker in part for part in (p.info["cmdline"] or [])):
                procs.setdefault(p.pid, p)
    for p in procs.values():
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    if proc.poll() is None:
        proc.wait(timeout=5)


class RayHead:
    """`ray start --head --block` on 127.0.0.1 with its own temp dir and ports."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.temp_dir = root
        self.dashboard_port = free_port()
        self.metrics_port = free_port()
        self.env = env
        cmd = [
            str(VENV_BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
            "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
            f"--port={free_port()}", f"--dashboard-port={self.dashboard_port}",
            f"--metrics-export-port={self.metrics_port}", f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={root}",
            "--num-cpus=6", f"--object-store-memory={300 * 1024**2}",
        ]
        self.log = open(root.parent / "ray-start.log", "wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def service_discovery_file(self) -> Path:
        from ray._private import ray_constants

        return self.temp_dir / ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"ray start exited: {(self.temp_dir.parent / 'ray-start.log').read_text()}")
            return http_json(f"{self.address}/api/version") is not None and self.service_discovery_file.exists()

        wait_for("the Ray head's job API and service-discovery file", ready, timeout=180)

    def stop(self) -> None:
        stop_tree(self.proc, marker=str(self.temp_dir))
        self.log.close()


class Prometheus:
    """Debian's prometheus binary on 127.0.0.1, configured from deploy/prometheus.yml."""

    def __init__(self, root: Path, service_discovery_file: Path) -> None:
        config = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
        config["global"]["scrape_interval"] = "1s"
        config["global"]["evaluation_interval"] = "1s"
        [job] = config["scrape_configs"]
        job["file_sd_configs"] = [{"files": [str(service_discovery_file)], "refresh_interval": "1s"}]
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        cmd = [
            _binary("prometheus"), f"--config.file={root / 'prometheus.yml'}",
            f"--storage.tsdb.path={root / 'tsdb'}", f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        self.log = open(root / "prometheus.log", "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def api(self, path: str, **params: str) -> Any:
        answer = http_json(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}")
        assert answer["status"] == "success", answer
        return answer["data"]

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.proc.returncode}")
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=5) as resp:  # noqa: S310
                return resp.status == 200

        wait_for("Prometheus /-/ready", ready, timeout=60)

    def stop(self) -> None:
        stop_tree(self.proc)
        self.log.close()


@pytest.fixture()
def ray_and_prometheus() -> Iterator[tuple[RayHead, Prometheus, Path]]:
    # short path: Ray's unix sockets live under the temp dir (108-byte limit)
    work = Path(tempfile.mkdtemp(prefix="eue2e", dir="/tmp"))
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",  # the job's entrypoint finds `euphonium-ray`
        "RAY_AUTH_MODE": "disabled",
        "RAY_metrics_report_interval_ms": "1000",  # export every second, so a short run is scraped
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("RAY_ADDRESS", None)
    head = RayHead(work / "ray", env)
    prometheus = None
    try:
        head.wait_ready()
        prometheus = Prometheus(work, head.service_discovery_file)
        prometheus.wait_ready()
        yield head, prometheus, work
    finally:
        if prometheus is not None:
            prometheus.stop()
        head.stop()
        shutil.rmtree(work, ignore_errors=True)


def build_toy_world(work: Path, env: dict[str, str]) -> list[str]:
    """The toy model folder and a latent PRM for it, built by the project's own commands; returns the --set
    overrides that point the run at them."""
    model = work / "toy-model"
    prm = work / "toy-prm"
    cli = str(VENV_BIN / "euphonium-ray")
    for cmd in (
        [cli, "toy", "build", str(model), "--device", "cpu"],
        [cli, "train-prm", "--config", "configs/toy.yaml", "--model", str(model),
         "--prompts", str(model / "embeddings" / "videos2caption.json"), "--orm", "toy", "--out", str(prm),
         "--rollouts", "4", "--group-size", "2", "--epochs", "1", "--device", "cpu"],
    ):
        out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"{' '.join(cmd[1:3])} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return [f"model.path={model}", f"data.prompts={model / 'embeddings' / 'videos2caption.json'}", "data.eval_prompts=null",
            f"rewards.prm.path={prm}"]


# ---------------------------------------------------------------------------------------------- the e2e
@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(1500)
def test_submitted_toy_training_exports_euphonium_metrics_to_a_real_prometheus(
    ray_and_prometheus: tuple[RayHead, Prometheus, Path],
) -> None:
    head, prometheus, work = ray_and_prometheus
    started = time.time()
    overrides = build_toy_world(work, head.env)
    overrides += [f"steps={TRAIN_STEPS}", f"output.dir={work / 'run'}", "output.eval_every=1",
                  "data.prompts_per_step=1", "sampler.group_size=4",
                  "rewards.latent_outcome=true",  # the dashboard's PRM panel plots the latent outcome score
                  "output.eval_count=1", "output.eval_samples_per_prompt=1"]  # the demo's 8x16 ODE evaluation: 1x1
    submit = ["bash", str(REPO / "deploy" / "submit.sh"), "--address", head.address, "--submission-id", "e2e",
              "--", "--config", "configs/toy.yaml", *(a for o in overrides for a in ("--set", o))]
    out = subprocess.run(submit, env=head.env, cwd=REPO, capture_output=True, text=True, timeout=1200)
    from ray.job_submission import JobStatus, JobSubmissionClient

    status = JobSubmissionClient(head.address).get_job_status("e2e")
    assert status == JobStatus.SUCCEEDED, f"job {status}:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    assert "ray job submit --address" in out.stderr  # submit.sh echoes the command it ran

    # The series the run exported, as Prometheus stored them (the API also lists series gone stale since).
    window = {"start": str(started - 60), "end": str(time.time() + 60)}
    board = json.loads((REPO / "deploy" / "grafana" / "euphonium.json").read_text())
    expressions = dashboards.panel_expressions(board)
    dashboard_names = set().union(*(dashboards.metric_names(e) for _, e in expressions))
    expected = dashboard_names - ONLY_WHEN_SAMPLES_ARE_DROPPED

    def exported() -> set[str]:
        match = {"match[]": '{__name__=~"ray_euphonium_.+"}'}
        return set(prometheus.api("label/__name__/values", **window, **match))

    try:
        names = wait_for("the dashboard's series in Prometheus", lambda: expected <= exported() and exported(), 30)
    except AssertionError:
        got = exported()
        pytest.fail(f"dashboard series the run did not export: {sorted(expected - got)}; exported: {sorted(got)}")
    assert dashboard_names - names <= ONLY_WHEN_SAMPLES_ARE_DROPPED  # the dashboard reads what the run exported
    assert names <= dashboard_names  # and the run exported nothing the dashboard leaves out

    # the steps counter counts exactly this run's steps, labelled with the head's Ray session
    [steps] = prometheus.api("query", query="max_over_time(ray_euphonium_steps_total[30m])")["result"]
    assert float(steps["value"][1]) == TRAIN_STEPS
    session = (head.temp_dir / "session_latest").resolve().name
    series = prometheus.api("series", **window, **{"match[]": "ray_euphonium_steps_total"})
    assert {s["SessionName"] for s in series} == {session} and {s["job"] for s in series} == {"ray"}

    # every panel query, with Grafana's variables filled in, is valid PromQL and draws the run's data over its time
    # range (a range query, as Grafana's panels make: Ray stops exporting a gauge soon after its process exits, so
    # an instant query after the run finds only the counters)
    for title, expr in expressions:
        query = expr.replace("$SessionName", session).replace("$__rate_interval", "1m")
        result = prometheus.api("query_range", query=query, step="1s", **window)  # fails the test on bad PromQL
        if not dashboards.metric_names(expr) & ONLY_WHEN_SAMPLES_ARE_DROPPED:
            assert result["result"], f"panel {title!r}: {query} finds no data during the run"
