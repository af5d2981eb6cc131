"""The Grafana dashboard and docs/metrics.md are generated from the metrics catalog, and `dashboards push`
speaks Grafana's HTTP API.

No Grafana server can be installed here (Debian bookworm has no `grafana` package; PyPI's `grafana` is an empty
placeholder), so the push is tested up to the wire against `RecordingGrafanaStandIn`, a small HTTP server on
127.0.0.1 that stands in for the Grafana server we cannot run and records what the client sent.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

from euphonium_ray import dashboards
from euphonium_ray.metrics_catalog import METRICS

REPO = Path(__file__).resolve().parents[1]
COMMITTED_DASHBOARD = REPO / "deploy" / "grafana" / "euphonium.json"
COMMITTED_DOCS = REPO / "docs" / "metrics.md"


def ray_series_names() -> set[str]:
    """What Prometheus sees for the catalog, by Ray's naming (checked against a live Ray in the e2e test):
    prefix ``ray_``; a counter ends in ``_total`` exactly once; a histogram is three series."""
    names: set[str] = set()
    for m in METRICS:
        base = "ray_" + m.name
        if m.kind == "counter":
            names.add(base if base.endswith("_total") else base + "_total")
        elif m.kind == "histogram":
            names |= {base + "_bucket", base + "_sum", base + "_count"}
        else:
            names.add(base)
    return names


# --------------------------------------------------------------------------------------------- generation
def test_committed_dashboard_json_is_what_the_catalog_generates(capsys: pytest.CaptureFixture[str]) -> None:
    assert dashboards.main(["build", "--out", str(COMMITTED_DASHBOARD), "--check"]) == 0
    assert json.loads(COMMITTED_DASHBOARD.read_text()) == dashboards.dashboard_json()


def test_build_check_fails_on_a_stale_dashboard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stale = json.loads(COMMITTED_DASHBOARD.read_text())
    stale["panels"] = stale["panels"][:-1]
    path = tmp_path / "euphonium.json"
    path.write_text(json.dumps(stale))
    assert dashboards.main(["build", "--out", str(path), "--check"]) == 1
    assert "out of date" in capsys.readouterr().err


def test_committed_metrics_doc_is_what_the_catalog_generates() -> None:
    assert dashboards.main(["docs", "--out", str(COMMITTED_DOCS), "--check"]) == 0
    text = COMMITTED_DOCS.read_text()
    for m in METRICS:  # every metric is a row of the table: name, type, tags, meaning
        tags = ", ".join(m.tags) or "-"
        assert f"| `{m.exported_name}` | {m.kind} | {tags} | {m.description} |" in text


def test_build_into_a_folder_writes_euphonium_json_like_rays_grafana_folder(tmp_path: Path) -> None:
    ray_dir = tmp_path / "session_latest" / "metrics" / "grafana" / "dashboards"
    ray_dir.mkdir(parents=True)
    assert dashboards.main(["build", "--out", str(ray_dir)]) == 0
    assert sorted(p.name for p in ray_dir.iterdir()) == ["euphonium.json"]  # no temporary file left behind
    assert (ray_dir / "euphonium.json").read_text() == COMMITTED_DASHBOARD.read_text()


# ---------------------------------------------------------------------------------------------- content
def test_metric_name_extractor_skips_functions_labels_keywords_and_numbers() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (le, phase) (rate(ray_a_bucket{SessionName=~"x{1}", b="c"}[5m]))) '
        "/ on (phase) group_left sum without (WorkerId) (ray_b_total offset 5m) > bool 0 and ray_c"
    )
    assert dashboards.metric_names(expr) == {"ray_a_bucket", "ray_b_total", "ray_c"}


def test_dashboard_queries_read_exactly_the_catalogs_series() -> None:
    board = json.loads(COMMITTED_DASHBOARD.read_text())
    read = set().union(*(dashboards.metric_names(expr) for _, expr in dashboards.panel_expressions(board)))
    assert read == ray_series_names()
    # and the SessionName variable is fed by a series the run exports
    session = next(v for v in board["templating"]["list"] if v["name"] == "SessionName")
    feeding = re.fullmatch(r"label_values\((\w+), SessionName\)", session["query"]["query"])
    assert feeding and feeding.group(1) in ray_series_names()


def test_dashboard_has_the_rows_and_panels_an_operator_asks_for() -> None:
    board = json.loads(COMMITTED_DASHBOARD.read_text())
    rows: dict[str, list[dict[str, Any]]] = {}
    current = ""
    for panel in board["panels"]:
        if panel["type"] == "row":
            current = panel["title"]
            rows[current] = []
        else:
            rows[current].append(panel)

    def queries_in(row_word: str) -> str:
        row = next(title for title in rows if row_word in title)
        return " ".join(t["expr"] for p in rows[row] for t in p["targets"])

    assert {"ray_euphonium_reward_orm_mean", "ray_euphonium_reward_prm_mean"} <= dashboards.metric_names(
        queries_in("Rewards")
    )
    assert "by (sde_step)" in queries_in("Rewards")  # process reward by step
    learner = queries_in("Learner")
    assert all(f"ray_euphonium_{m}" in learner for m in ("loss", "clip_fraction", "kl"))
    assert "by (phase)" in queries_in("phase")
    throughput = queries_in("Throughput")
    assert "rate(ray_euphonium_videos_total" in throughput and "rate(ray_euphonium_transitions_total" in throughput
    weights = queries_in("Weight")
    assert "ray_euphonium_weight_sync_seconds" in weights and "ray_euphonium_version_lag" in weights
    assert "ray_euphonium_gpu_memory_bytes" in queries_in("Memory")
    units = {p["title"]: p["fieldConfig"]["defaults"]["unit"] for r in rows.values() for p in r}
    assert units["Videos per second"] == "suffix: videos/s" and units["GPU memory bytes by role"] == "bytes"


def test_dashboard_layout_has_unique_ids_and_no_overlapping_panels() -> None:
    board = json.loads(COMMITTED_DASHBOARD.read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)) and 0 not in ids
    cells: set[tuple[int, int]] = set()
    for p in board["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine
    for p in board["panels"]:
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert [t["refId"] for t in p["targets"]] == ["A", "B"][: len(p["targets"])]


# ------------------------------------------------------------------------------------------------ pushing
class RecordingGrafanaStandIn(ThreadingHTTPServer):
    """Stands in for a Grafana server (none can be installed here): records each request and answers as
    Grafana's POST /api/dashboards/db does."""

    def __init__(self, status: int = 200) -> None:
        self.requests: list[dict[str, Any]] = []
        self.status = status
        super().__init__(("127.0.0.1", 0), _RecordingHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _RecordingHandler(BaseHTTPRequestHandler):
    server: RecordingGrafanaStandIn

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.requests.append(
            {"method": "POST", "path": self.path, "headers": dict(self.headers), "body": body}
        )
        if self.server.status == 200:
            uid = json.loads(body)["dashboard"]["uid"]
            answer = {"id": 7, "uid": uid, "url": f"/d/{uid}/x", "status": "success", "version": 3, "slug": "x"}
        else:
            answer = {"message": "Invalid API key"}
        data = json.dumps(answer).encode()
        self.send_response(self.server.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def grafana_stand_in(request: pytest.FixtureRequest) -> Iterator[RecordingGrafanaStandIn]:
    server = RecordingGrafanaStandIn(getattr(request, "param", 200))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_push_posts_the_dashboard_with_the_bearer_token(
    grafana_stand_in: RecordingGrafanaStandIn, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GRAFANA_TOKEN", "glsa_test_token_123")
    assert dashboards.main(["push", "--url", grafana_stand_in.url, "--folder-uid", "rl"]) == 0
    [req] = grafana_stand_in.requests
    assert (req["method"], req["path"]) == ("POST", "/api/dashboards/db")
    headers = {k.lower(): v for k, v in req["headers"].items()}
    assert headers["authorization"] == "Bearer glsa_test_token_123"
    assert headers["content-type"].startswith("application/json")
    body = json.loads(req["body"])
    assert body["dashboard"] == json.loads(COMMITTED_DASHBOARD.read_text())
    assert body["overwrite"] is True and body["folderUid"] == "rl"
    assert "id" not in body["dashboard"]  # Grafana matches on uid; an id would point at another instance's row
    assert "uid=euphonium-ray version=3" in capsys.readouterr().out


def test_push_of_a_file_sends_that_file(
    grafana_stand_in: RecordingGrafanaStandIn, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    board = {"uid": "custom", "title": "edited", "panels": []}
    (tmp_path / "b.json").write_text(json.dumps(board))
    monkeypatch.setenv("MY_TOKEN", "t2")
    args = ["push", "--url", grafana_stand_in.url, "--file", str(tmp_path / "b.json"), "--token-env", "MY_TOKEN"]
    assert dashboards.main(args) == 0
    [req] = grafana_stand_in.requests
    assert json.loads(req["body"])["dashboard"] == board
    assert {k.lower(): v for k, v in req["headers"].items()}["authorization"] == "Bearer t2"


def test_push_without_a_token_names_the_variable_and_sends_nothing(
    grafana_stand_in: RecordingGrafanaStandIn, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("GRAFANA_TOKEN", raising=False)
    assert dashboards.main(["push", "--url", grafana_stand_in.url]) == 2
    assert "GRAFANA_TOKEN is not set" in capsys.readouterr().err
    assert grafana_stand_in.requests == []


@pytest.mark.parametrize("grafana_stand_in", [401], indirect=True)
def test_push_reports_a_rejected_token(
    grafana_stand_in: RecordingGrafanaStandIn, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GRAFANA_TOKEN", "wrong")
    assert dashboards.main(["push", "--url", grafana_stand_in.url]) == 1
    err = capsys.readouterr().err
    assert "GrafanaUnauthorizedError" in err and grafana_stand_in.url in err


def test_push_rejects_a_file_that_is_not_a_dashboard(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GRAFANA_TOKEN", "t")
    (tmp_path / "x.json").write_text('{"hello": 1}')
    assert dashboards.main(["push", "--url", "http://127.0.0.1:9", "--file", str(tmp_path / "x.json")]) == 2
    assert "is not a Grafana dashboard" in capsys.readouterr().err


def test_catalog_names_and_descriptions_are_ascii_as_ray_metrics_require() -> None:
    # ray.util.metrics hands them to C++ as ASCII: a non-ASCII description ("x̂0") made creating the Gauge raise
    # UnicodeEncodeError, which killed the submitted job before any metric was exported (seen on a real head).
    for m in METRICS:
        assert m.name.isascii() and m.description.isascii() and all(t.isascii() for t in m.tags), m.name


# ------------------------------------------------------------------------------- URLs and credentials
def test_push_url_defaults_to_https_and_plain_http_is_only_for_this_machine() -> None:
    assert dashboards.grafana_url("grafana.example.com") == "https://grafana.example.com"
    assert dashboards.grafana_url("grafana.monitoring.svc:3000") == "https://grafana.monitoring.svc:3000"
    assert dashboards.grafana_url("http://127.0.0.1:3000") == "http://127.0.0.1:3000"
    assert dashboards.grafana_url("http://localhost:3000") == "http://localhost:3000"
    assert dashboards.grafana_url("http://grafana.lan:3000", allow_http=True) == "http://grafana.lan:3000"
    with pytest.raises(ValueError, match=r"^--url http://grafana.lan:3000 is plain http: the token would cross"):
        dashboards.grafana_url("http://grafana.lan:3000")


def test_push_refuses_plain_http_to_another_machine_before_sending_anything(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GRAFANA_TOKEN", "glsa_never_sent_42")
    assert dashboards.main(["push", "--url", "http://192.0.2.10:3000", "--timeout", "1"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["error: --url http://192.0.2.10:3000 is plain http: the token would cross the network "
                                "unencrypted; use https (the default without a scheme), or pass --allow-http on a "
                                "network you trust"]


@pytest.mark.parametrize("grafana_stand_in", [401], indirect=True)
def test_push_errors_never_echo_the_token_or_credentials_in_the_url(
    grafana_stand_in: RecordingGrafanaStandIn, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    token = "glsa_SECRET_5f3a9c"
    monkeypatch.setenv("GRAFANA_TOKEN", token)
    host = grafana_stand_in.url.removeprefix("http://")
    cases = {  # url -> expected exit code
        f"http://admin:hunter2@{host}": 2,  # credentials in the URL: refused, and not repeated
        f"http://{host}/?auth={token}&pw=hunter2": 1,  # rejected by the stand-in (401); query dropped from messages
        f"http://127.0.0.1:9/x?auth={token}": 1,  # nothing listens: a connection error
    }
    for url, code in cases.items():
        assert dashboards.main(["push", "--url", url, "--timeout", "2"]) == code
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.splitlines()) == 1, err
        assert token not in err and "hunter2" not in err and "admin" not in err, err
    assert len(grafana_stand_in.requests) == 1  # only the one with a clean address reached the server
