"""Deployment files against the server: Grafana dashboards, Prometheus rules and the dashboard renderer.

A renamed metric or a mistyped bucket bound does not break a dashboard loudly, the panel just says
"No data" from then on; these tests make it loud. The promtool checks run where Debian's `prometheus`
package is installed (apt-get install -y --no-install-recommends prometheus) and are skipped elsewhere.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
import yaml

from tests.scripts import load_script
from verispec.config import ServerSettings
from verispec.server.metrics import ServerMetrics

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = sorted((ROOT / "deploy" / "grafana").glob("*.json"))
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"
PANEL_TYPES = {"timeseries", "stat", "gauge", "bargauge", "heatmap"}
MODEL_MATCHER = 'model_name=~"$model_name"'
# What a dashboard's variables stand for when its queries are checked outside Grafana.
GRAFANA_VARIABLES = {"model_name": ".*", "__rate_interval": "1m", "__interval": "15s", "__range": "1h"}
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not on PATH; install it: apt-get install -y --no-install-recommends prometheus"
)

METRIC = re.compile(r"verispec:[A-Za-z0-9_:]+")
SELECTOR = re.compile(r"(verispec:[A-Za-z0-9_:]+)(\{[^}]*\})?")


def load_renderer():
    return load_script("render_dashboards")


def dashboard_exprs() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) for every query of every dashboard."""
    return [
        (path.name, panel["title"], target["expr"])
        for path in DASHBOARDS
        for panel in json.loads(path.read_text())["panels"]
        for target in panel.get("targets", [])
    ]


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    """Every series name the server can export, with the `le` bounds of each `_bucket` series.

    Families are read as well as samples: a labelled counter nobody has incremented yet
    (request outcomes, breaker transitions) exports no sample, but dashboards may still query it.
    """
    metrics = ServerMetrics("m", ServerSettings(), max_depth=8)
    names: dict[str, set[str]] = {}
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    for family in metrics.registry.collect():
        for suffix in suffixes.get(family.type, [""]):
            names.setdefault(family.name + suffix, set())
        for sample in family.samples:
            bounds = names.setdefault(sample.name, set())
            if "le" in sample.labels:
                bounds.add(sample.labels["le"])
    return names


def test_there_are_three_dashboards():
    assert {p.stem for p in DASHBOARDS} >= {"executive", "oncall", "debug"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_structure(path: Path):
    board = json.loads(path.read_text())
    assert board.get("title") and board.get("uid")
    assert board.get("schemaVersion", 0) >= 36  # Grafana 9+; older versions migrate panels on import
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["model_name"]["includeAll"]

    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    occupied: dict[tuple[int, int], str] = {}
    for panel in board["panels"]:
        title = panel.get("title")
        assert title, f"panel {panel['id']} has no title"
        assert panel["type"] in PANEL_TYPES, f"{title}: unexpected panel type {panel['type']}"
        pos = panel["gridPos"]
        assert all(isinstance(pos[k], int) for k in "xywh"), title
        assert pos["w"] > 0 and pos["h"] > 0 and pos["x"] + pos["w"] <= 24, f"{title}: off the 24-column grid"
        for cell in ((x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])):
            assert cell not in occupied, f"{title} overlaps {occupied[cell]}"
            occupied[cell] = title
        assert panel["targets"], f"{title}: no queries"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), f"{title}: duplicate refIds"
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), f"{title}: empty expr"
            assert "legendFormat" in target, f"{title}: no legendFormat"
            assert target["datasource"]["uid"] == "${datasource}"


@pytest.mark.parametrize("board, title, expr", dashboard_exprs(), ids=lambda v: v if len(v) < 40 else "")
def test_dashboard_queries_filter_by_model(board: str, title: str, expr: str):
    """Every verispec selector follows the model picker, or one panel would show all models mixed."""
    selectors = SELECTOR.findall(expr)
    assert selectors, f"{board} / {title}: queries no verispec metric"
    for name, labels in selectors:
        assert MODEL_MATCHER in labels, f"{board} / {title}: {name} ignores $model_name"


def check_names(where: str, expr: str, exported: dict[str, set[str]]) -> None:
    for name in METRIC.findall(expr):
        assert name in exported, f"{where}: {name} is not exported by the server"
    # A bucket bound must be one the histogram has (10.0, not 10), or the selector matches nothing.
    for name, labels in SELECTOR.findall(expr):
        for bound in re.findall(r'le="([^"]*)"', labels or ""):
            assert bound in exported[name], f"{where}: {name} has no bucket le={bound!r}"


def test_dashboard_metrics_exist(exported):
    for board, title, expr in dashboard_exprs():
        check_names(f"{board} / {title}", expr, exported)


def test_alert_metrics_exist(exported):
    for rule in alert_rules():
        check_names(rule["alert"], rule["expr"], exported)


def test_alert_rules_are_complete():
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert rule.get("for"), f"{rule['alert']}: no `for`, a single bad scrape would fire it"
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"].get("summary") and rule["annotations"].get("description"), rule["alert"]
    # The brief of the rule file: each of these concerns has an alert.
    for wanted in ("AcceptanceRateLow", "AcceptanceRateDrop", "E2ELatencyP99", "TTFTP99", "ErrorBudgetBurnFast",
                   "ErrorBudgetBurnSlow", "VerifierSaturated", "RequestsQueueing", "BreakerOpen"):
        assert any(wanted in n for n in names), f"no alert for {wanted}"


@needs_promtool
def test_promtool_check_rules():
    result = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_check_config():
    result = subprocess.run([PROMTOOL, "check", "config", str(PROMETHEUS_DIR / "prometheus.yml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_alert_unit_tests():
    result = subprocess.run([PROMTOOL, "test", "rules", str(ALERTS_TEST)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_dashboard_queries_parse(tmp_path: Path):
    """Dashboard PromQL through Prometheus' own parser: each query as a recording rule, checked by promtool."""
    substitute = load_renderer().substitute
    rules = [
        {"record": f"dashboard:query_{i}", "expr": substitute(expr, GRAFANA_VARIABLES)}
        for i, (_, _, expr) in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# -- the renderer ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def renderer():
    return load_renderer()


@pytest.mark.parametrize(
    "expr, want",
    [
        ('rate(x{model_name=~"$model_name"}[$__rate_interval])', 'rate(x{model_name=~".*"}[1m])'),
        ("${model_name} [[model_name]] ${model_name:regex}", ".* .* .*"),
        ("increase(x[$__range])", "increase(x[1h])"),
        ("$unknown stays", "$unknown stays"),
    ],
)
def test_substitute(renderer, expr, want):
    assert renderer.substitute(expr, GRAFANA_VARIABLES) == want


@pytest.mark.parametrize(
    "value, unit, decimals, want",
    [
        (0.8537, "percentunit", None, "85.4%"),
        (0.8537, "percentunit", 2, "85.37%"),
        (0.0123, "s", None, "12.3 ms"),
        (0, "s", None, "0 s"),
        (1050, "short", None, "1.05 K"),
        (0.00012, "currencyUSD", None, "$0.00012"),
        (2.5, "reqps", None, "2.5 req/s"),
        (float("nan"), "short", None, "N/A"),
    ],
)
def test_format_value(renderer, value, unit, decimals, want):
    assert renderer.format_value(value, unit, decimals) == want


def test_window_builtins(renderer):
    start = datetime(2026, 1, 1, tzinfo=UTC)
    window = renderer.Window(start, start + timedelta(minutes=30), step_s=6, scrape_s=2)
    # Grafana's rule: at least four scrapes, and at least a step plus one scrape.
    assert window.builtins()["__rate_interval"] == "8s"
    assert window.builtins()["__range"] == "1800s"
    assert renderer.auto_step(1800, 15) == 15 and renderer.auto_step(6 * 3600, 15) == 72


def test_deaccumulate_turns_cumulative_buckets_into_counts(renderer):
    times = np.array([1.0, 2.0])

    def bucket(le, values):
        return renderer.Series({"le": le}, times, np.array(values, dtype=float))

    counts = renderer.deaccumulate([bucket("+Inf", [10, 12]), bucket("1.0", [7, 9]), bucket("0.0", [3, 3])])
    assert [s.labels["le"] for s in counts] == ["0.0", "1.0", "+Inf"]
    assert [list(s.values) for s in counts] == [[3, 3], [4, 6], [3, 3]]


def test_legend(renderer):
    assert renderer.legend("pos {{position}}", {"position": "3"}, "x") == "pos 3"
    assert renderer.legend("__auto", {"status": "503"}, "x") == '{status="503"}'


class FakePrometheus(BaseHTTPRequestHandler):
    """Answers query_range with one gently rising series, or with cumulative buckets for `by (le)` queries."""

    queries: list[str] = []

    def do_GET(self):
        url = urlparse(self.path)
        params = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path == "/api/v1/status/config":
            body = {"status": "success", "data": {"yaml": "global:\n  scrape_interval: 5s\n"}}
        else:
            FakePrometheus.queries.append(params["query"])
            start, end, step = float(params["start"]), float(params["end"]), float(params["step"])
            stamps = np.arange(start, end + step / 2, step)

            def series(labels, scale):
                return {"metric": labels, "values": [[t, str(scale * (1 + i / len(stamps)))] for i, t in enumerate(stamps)]}

            query = params["query"]
            if "by (le)" in query and "histogram_quantile" not in query:
                result = [series({"le": le}, n) for le, n in (("0.0", 2), ("1.0", 5), ("+Inf", 9))]
            else:
                result = [series({"status": "503", "position": "0", "instance": "a"}, 0.5)]
            body = {"status": "success", "data": {"resultType": "matrix", "result": result}}
        payload = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):  # keep pytest's output clean
        pass


def test_render_dashboards_end_to_end(renderer, tmp_path: Path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakePrometheus)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        FakePrometheus.queries.clear()
        code = renderer.main([
            "--prometheus", f"http://127.0.0.1:{server.server_port}", "--start", "2026-01-01T12:00:00Z",
            "--end", "2026-01-01T12:30:00", "--out", str(tmp_path), "--var", "model_name=ref-code-target",
            *map(str, DASHBOARDS),
        ])
    finally:
        server.shutdown()
        thread.join()
    assert code == 0
    for path in DASHBOARDS:
        png = tmp_path / f"{path.stem}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(FakePrometheus.queries) == len(dashboard_exprs())
    leftover = [q for q in FakePrometheus.queries if "$" in q]
    assert not leftover, f"variables left unsubstituted: {leftover[:3]}"
    assert all('model_name=~"ref-code-target"' in q for q in FakePrometheus.queries)
    # 30 minutes at a 5 s scrape: a 6 s step (300 points) and a 20 s rate window (four scrapes).
    assert any("[20s]" in q for q in FakePrometheus.queries)
