"""The Grafana dashboard and the metrics doc, both generated from ``metrics_catalog.METRICS``.

One table drives the metric objects, the docs and the dashboard, so a renamed metric cannot leave a panel that
queries nothing. The dashboard is built with Grafana's own Python builders (grafana-foundation-sdk) and uploaded
with grafana-client; ``euphonium-ray dashboards build|push|docs`` is the command line.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import sys
import urllib.parse
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders.common import VizLegendOptions, VizTooltipOptions
from grafana_foundation_sdk.builders.dashboard import Dashboard, DatasourceVariable, QueryVariable, Row
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.builders.timeseries import Panel as TimeseriesPanel
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_models
from grafana_foundation_sdk.models import dashboard as dashboard_models

from euphonium_ray.files import write_atomic
from euphonium_ray.metrics_catalog import METRICS, MetricSpec, markdown_table

DASHBOARD_UID = "euphonium-ray"
DASHBOARD_TITLE = "Euphonium-Ray training"
DASHBOARD_FILE = "euphonium.json"
DEFAULT_OUT = Path("deploy/grafana") / DASHBOARD_FILE
DEFAULT_DOCS = Path("docs/metrics.md")
TOKEN_ENV = "GRAFANA_TOKEN"
# Ray provisions its own Grafana from this folder of the head's current session (metrics_head.py); a dashboard
# written there after `ray start --head` shows up beside Ray's default dashboards.
RAY_DASHBOARDS_DIR = "/tmp/ray/session_latest/metrics/grafana/dashboards"

# Filters every query to the Ray session chosen at the top of the dashboard (Ray labels all metrics with it).
SESSION_FILTER = '{SessionName=~"$SessionName"}'
RATE_WINDOW = "$__rate_interval"
DATASOURCE = dashboard_models.DataSourceRef(type_val="prometheus", uid="${datasource}")

ROW_TITLES: dict[str, str] = {
    "rewards": "Rewards: ORM, PRM, process reward by step",
    "learner": "Learner: loss, clip fraction, KL",
    "rollout": "Rollout: reward-gradient guidance",
    "time": "Step time by phase",
    "throughput": "Throughput",
    "weights": "Weight broadcast and version lag",
    "memory": "Memory",
}
# How several series of one gauge (one per actor) collapse into a line; the mean unless a peak or floor matters.
GAUGE_AGGREGATION: dict[str, str] = {
    "euphonium_gpu_memory_bytes": "max",
    "euphonium_rss_bytes": "max",
    "euphonium_version_lag": "max",
    "euphonium_weight_version": "min",
}
GRAFANA_UNITS = {"s": "s", "bytes": "bytes", "": "short"}


# ------------------------------------------------------------------------------------------------ queries
def _noun(spec: MetricSpec) -> str:
    """The metric's own words: "euphonium_videos_total" -> "videos"."""
    return spec.name.removeprefix("euphonium_").removesuffix("_total")


def _by(tags: tuple[str, ...]) -> str:
    return f" by ({', '.join(tags)})" if tags else ""


def _legend(spec: MetricSpec, suffix: str = "") -> str:
    label = " ".join("{{" + tag + "}}" for tag in spec.tags) or _noun(spec)
    return f"{label}{suffix}"


def panel_queries(spec: MetricSpec) -> list[tuple[str, str]]:
    """PromQL expressions and legends for one catalog metric, by kind: gauges as levels, counters as rates,
    histograms as mean and p90."""
    series = spec.exported_name
    if spec.kind == "gauge":
        agg = GAUGE_AGGREGATION.get(spec.name, "avg")
        return [(f"{agg}{_by(spec.tags)} ({series}{SESSION_FILTER})", _legend(spec))]
    if spec.kind == "counter":
        return [(f"sum{_by(spec.tags)} (rate({series}{SESSION_FILTER}[{RATE_WINDOW}]))", _legend(spec))]
    if spec.kind == "histogram":

        def rate(part: str) -> str:
            return f"rate({series}_{part}{SESSION_FILTER}[{RATE_WINDOW}])"

        mean = f"sum{_by(spec.tags)} ({rate('sum')}) / sum{_by(spec.tags)} ({rate('count')})"
        p90 = f"histogram_quantile(0.9, sum{_by(('le', *spec.tags))} ({rate('bucket')}))"
        return [(mean, _legend(spec, " mean")), (p90, _legend(spec, " p90"))]
    raise ValueError(f"metric {spec.name}: unknown kind {spec.kind!r}")


_ACRONYMS = {"orm": "ORM", "prm": "PRM", "kl": "KL", "gpu": "GPU", "rss": "RSS", "sde": "SDE"}


def panel_title(spec: MetricSpec) -> str:
    title = " ".join(_ACRONYMS.get(w, w) for w in _noun(spec).split("_"))
    title = title[0].upper() + title[1:]
    if spec.kind == "counter":
        return f"{title} per second"
    if spec.kind == "histogram":
        title += " (mean, p90)"
    if spec.tags:
        title += " by " + ", ".join(spec.tags)
    return title


def panel_unit(spec: MetricSpec) -> str:
    if spec.kind == "counter":  # a rate: "videos/s", "steps/s"
        return f"suffix: {_noun(spec).replace('_', ' ')}/s"
    if spec.unit not in GRAFANA_UNITS:
        raise ValueError(f"metric {spec.name}: no Grafana unit for {spec.unit!r}; add it to GRAFANA_UNITS")
    return GRAFANA_UNITS[spec.unit]


# ---------------------------------------------------------------------------------------------- dashboard
def _panel(spec: MetricSpec, panel_id: int) -> TimeseriesPanel:
    panel = (
        TimeseriesPanel()
        .id(panel_id)
        .title(panel_title(spec))
        .description(f"{spec.description} (`{spec.exported_name}`, {spec.kind})")
        .datasource(DATASOURCE)
        .unit(panel_unit(spec))
        .span(12)
        .height(8)
        .legend(
            VizLegendOptions()
            .show_legend(True)
            .display_mode(common_models.LegendDisplayMode.LIST)
            .placement(common_models.LegendPlacement.BOTTOM)
            .calcs(["lastNotNull"])
        )
        .tooltip(VizTooltipOptions().mode(common_models.TooltipDisplayMode.MULTI).sort(common_models.SortOrder.NONE))
    )
    for ref, (expr, legend) in zip("ABCDEFGH", panel_queries(spec)):
        panel.with_target(Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DATASOURCE))
    return panel


def _variables() -> list[Any]:
    datasource = DatasourceVariable("datasource").label("Prometheus").type("prometheus")
    steps = next(m for m in METRICS if m.name == "euphonium_steps_total").exported_name
    session = (
        QueryVariable("SessionName")
        .label("Ray session")
        .description("Ray session the training ran in (Ray labels every metric with SessionName)")
        .datasource(DATASOURCE)
        .query({"query": f"label_values({steps}, SessionName)", "refId": "SessionName"})
        .refresh(dashboard_models.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dashboard_models.VariableSort.ALPHABETICAL_DESC)
        .include_all(True)
        .all_value(".*")
    )
    return [datasource, session]


def build_dashboard() -> Dashboard:
    """One row per catalog group (in catalog order), one time-series panel per metric."""
    board = (
        Dashboard(DASHBOARD_TITLE)
        .uid(DASHBOARD_UID)
        .description("Generated by `euphonium-ray dashboards build` from euphonium_ray/metrics_catalog.py")
        .tags(["euphonium", "ray", "generated"])
        .refresh("10s")
        .time("now-1h", "now")
        .timezone(common_models.TimeZoneBrowser)
        .tooltip(dashboard_models.DashboardCursorSync.CROSSHAIR)
    )
    for variable in _variables():
        board.with_variable(variable)
    groups: dict[str, list[MetricSpec]] = {}
    for spec in METRICS:
        groups.setdefault(spec.panel or "other", []).append(spec)
    panel_id = 0
    for group, specs in groups.items():
        panel_id += 1
        board.with_row(Row(ROW_TITLES.get(group, group.capitalize())).id(panel_id))
        for spec in specs:
            panel_id += 1
            board.with_panel(_panel(spec, panel_id))
    return board


def dashboard_json() -> dict[str, Any]:
    """The dashboard model as plain JSON data (what Grafana stores)."""
    return json.loads(json.dumps(build_dashboard().build(), cls=JSONEncoder))


def dashboard_text() -> str:
    return json.dumps(dashboard_json(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def panel_expressions(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel, rows included."""
    out: list[tuple[str, str]] = []
    for panel in board.get("panels", []):
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets") or []:
                out.append((inner.get("title", ""), target["expr"]))
    return out


# PromQL words that look like identifiers but name no series.
_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
                 "unless"}


def metric_names(expr: str) -> set[str]:
    """Series names a PromQL expression reads: identifiers that are not functions, keywords, labels or numbers."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    names = set()
    for match in re.finditer(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)\b(\s*\()?", text):
        word, is_call = match.group(1), match.group(2)
        if not is_call and word not in _PROMQL_WORDS:
            names.add(word)
    return names


# ----------------------------------------------------------------------------------------------- the docs
def metrics_markdown() -> str:
    """docs/metrics.md: the catalog table and every dashboard query, generated so neither can drift."""
    lines = [
        "# Metrics",
        "",
        "<!-- Generated by `euphonium-ray dashboards docs` from euphonium_ray/metrics_catalog.py; do not edit. -->",
        "",
        "The driver and actors emit these through `ray.util.metrics`. Ray exports application metrics with a `ray_`",
        "prefix on every node's metrics port (the names below are as Prometheus sees them); counters gain `_total`,",
        "histograms are exported as `_bucket`, `_sum` and `_count` series. Ray adds its own labels (`SessionName`,",
        "`NodeAddress`, `WorkerId`, ...) to the tags listed here.",
        "",
        markdown_table(),
        "",
        "## Dashboard",
        "",
        f"`euphonium-ray dashboards build` writes the Grafana dashboard `{DASHBOARD_TITLE}` (uid `{DASHBOARD_UID}`) to",
        f"`{DEFAULT_OUT}`; `--out {RAY_DASHBOARDS_DIR}` puts it where the Ray head's",
        "own Grafana provisioning reads dashboards; `euphonium-ray dashboards push --url URL` uploads it (token from",
        f"`{TOKEN_ENV}`). See docs/deploy.md. Its rows and queries:",
        "",
        "| row | panel | PromQL |",
        "|---|---|---|",
    ]
    board = dashboard_json()
    row = ""
    for panel in board["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
            continue
        for target in panel["targets"]:
            expr = target["expr"].replace("|", "\\|")
            lines.append(f"| {row} | {panel['title']} | `{expr}` |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ writing
def _target_file(out: str) -> Path:
    path = Path(out)
    return path / DASHBOARD_FILE if path.is_dir() or out.endswith(os.sep) else path


def _write_or_check(path: Path, text: str, check: bool, what: str) -> int:
    if check:
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current != text:
            print(f"error: {path} is out of date with the metrics catalog; run `euphonium-ray dashboards {what}`",
                  file=sys.stderr)
            return 1
        print(f"{path} is up to date")
        return 0
    write_atomic(path, text, mode=0o644)
    print(f"wrote {path}")
    return 0


# ------------------------------------------------------------------------------------------------- pushing
def push_dashboard(url: str, token: str, folder_uid: str | None = None, board: dict[str, Any] | None = None,
                   timeout: float = 10.0) -> dict[str, Any]:
    """Create or overwrite the dashboard on a Grafana server (POST /api/dashboards/db) with a service-account
    token; returns Grafana's answer (uid, url, version)."""
    from grafana_client import GrafanaApi

    payload: dict[str, Any] = {
        "dashboard": board if board is not None else dashboard_json(),
        "overwrite": True,
        "message": "euphonium-ray dashboards push",
    }
    if folder_uid:
        payload["folderUid"] = folder_uid
    api = GrafanaApi.from_url(url, credential=token, timeout=timeout)
    return api.dashboard.update_dashboard(payload)


def _read_dashboard_file(path: str) -> dict[str, Any]:
    try:
        board = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"dashboard file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"dashboard file {path} is not valid JSON: {exc}") from None
    if not isinstance(board, dict) or "panels" not in board or "uid" not in board:
        raise ValueError(f"dashboard file {path} is not a Grafana dashboard (no 'uid' or 'panels')")
    return board


def _shown(parts: urllib.parse.SplitResult) -> str:
    """A URL as it may be printed: no user, password, query or fragment."""
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"


def grafana_url(raw: str, allow_http: bool = False) -> str:
    """The base URL to push to. No scheme means https; plain http only to this machine or with ``allow_http``,
    since the token travels with the request; credentials in the URL are refused (the token comes from the
    environment). Errors (ValueError) never repeat a password or a query string."""
    url = raw.strip() if "://" in raw else f"https://{raw.strip()}"
    parts = urllib.parse.urlsplit(url)
    try:
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError:
        raise ValueError(f"--url {_shown(parts._replace(netloc=parts.hostname or ''))} has an invalid port") from None
    if parts.username or parts.password:
        raise ValueError(f"--url {_shown(parts)} carries credentials (user:password@); give only the address, the "
                         f"token comes from ${TOKEN_ENV}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--url {_shown(parts)!r} is not an http(s) URL of a Grafana server")
    if parts.scheme == "http" and not allow_http and not _loopback(parts.hostname):
        raise ValueError(f"--url {_shown(parts)} is plain http: the token would cross the network unencrypted; "
                         "use https (the default without a scheme), or pass --allow-http on a network you trust")
    return url


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _redacted(text: str, *secrets: str) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def _push_main(args: argparse.Namespace) -> int:
    token = os.environ.get(args.token_env, "")
    if not token:
        print(f"error: {args.token_env} is not set: export a Grafana service-account token in it", file=sys.stderr)
        return 2
    try:
        url = grafana_url(args.url, args.allow_http)
        board = _read_dashboard_file(args.file) if args.file else None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    parts = urllib.parse.urlsplit(url)
    try:
        answer = push_dashboard(url, token, args.folder_uid, board, args.timeout)
    except Exception as exc:  # grafana-client raises its own errors and niquests' connection errors
        why = _redacted(f"{type(exc).__name__}: {exc}", token, parts.query, parts.fragment)
        print(f"error: pushing the dashboard to {_shown(parts)} failed: {why}", file=sys.stderr)
        return 1
    print(f"pushed dashboard uid={answer.get('uid', DASHBOARD_UID)} version={answer.get('version')} "
          f"url={answer.get('url', '')}")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="euphonium-ray dashboards", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    build = sub.add_parser("build", help="write the Grafana dashboard JSON generated from the metrics catalog")
    build.add_argument("--out", default=str(DEFAULT_OUT),
                       help=f"file or existing folder (default {DEFAULT_OUT}; Ray's Grafana reads "
                            f"{RAY_DASHBOARDS_DIR})")
    build.add_argument("--check", action="store_true", help="exit 1 if the file differs instead of writing it")
    docs = sub.add_parser("docs", help="write docs/metrics.md generated from the metrics catalog")
    docs.add_argument("--out", default=str(DEFAULT_DOCS))
    docs.add_argument("--check", action="store_true", help="exit 1 if the file differs instead of writing it")
    push = sub.add_parser("push", help="upload the dashboard to a Grafana server with grafana-client")
    push.add_argument("--url", required=True,
                      help="Grafana base URL, e.g. https://grafana.monitoring:3000 (no scheme: https)")
    push.add_argument("--allow-http", action="store_true",
                      help="allow plain http to another machine (the token is then sent unencrypted)")
    push.add_argument("--token-env", default=TOKEN_ENV, help=f"variable holding the API token (default {TOKEN_ENV})")
    push.add_argument("--folder-uid", default=None, help="Grafana folder to put the dashboard in")
    push.add_argument("--file", default=None, help="push this dashboard JSON instead of generating it")
    push.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for Grafana")
    args = parser.parse_args(argv)
    if args.action == "build":
        return _write_or_check(_target_file(args.out), dashboard_text(), args.check, "build")
    if args.action == "docs":
        return _write_or_check(Path(args.out), metrics_markdown(), args.check, "docs")
    return _push_main(args)
