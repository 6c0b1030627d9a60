"""Render Grafana dashboards to PNG without Grafana: run each panel's queries against Prometheus, draw with matplotlib.

Grafana is not packaged for Debian, so the screenshots in docs/ and the preview of a dashboard edit come from
here instead. The renderer reads the same JSON that Grafana imports and understands the subset our dashboards
use: timeseries, stat, gauge, bargauge and heatmap panels laid out by `gridPos`; Grafana's template variables
($model_name and friends) and built-in intervals ($__rate_interval, $__interval, $__range); units, decimals,
thresholds, value mappings and a few per-panel options. Anything else is drawn plainly rather than refused.

    python scripts/render_dashboards.py --prometheus http://127.0.0.1:9090 \\
        --start 2026-01-01T12:00:00Z --end 2026-01-01T12:30:00Z --out docs/dashboards deploy/grafana/*.json

`--start now-30m --end now` works too. One PNG per dashboard, named after the JSON file.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI

import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402
from matplotlib.patches import FancyBboxPatch, Wedge  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

GRID_COLUMNS = 24
POINTS_PER_PANEL = 300  # Grafana asks for about one point per pixel of panel width; this is a wide panel's worth
DEFAULT_SCRAPE_S = 15.0  # Grafana's own fallback when the data source does not say

# Grafana's dark theme, so the screenshots look like the real thing.
THEME = {
    "page": "#111217", "panel": "#181b1f", "border": "#2c3235", "text": "#ccccdc", "muted": "#8e8e9a",
    "grid": "#2c3235", "error": "#f2495c",
}
# Grafana's named colours, and its classic palette for series.
NAMED_COLORS = {
    "green": "#73bf69", "red": "#f2495c", "yellow": "#fade2a", "orange": "#ff9830", "blue": "#5794f2",
    "purple": "#b877d9", "text": THEME["text"], "transparent": "#00000000",
}
PALETTE = ["#7eb26d", "#eab839", "#6ed0e0", "#ef843c", "#e24d42", "#1f78c1", "#ba43a9", "#705da0", "#508642", "#cca300"]


# -- time and variables ------------------------------------------------------------------------------------


def parse_duration(text: str) -> float:
    """'90s', '5m', '1h30m', '2d' -> seconds (Prometheus' duration syntax)."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """ISO 8601 (naive = UTC), a Unix timestamp, 'now' or 'now-30m'."""
    now = now or datetime.now(UTC)
    if text == "now":
        return now
    if text.startswith("now-"):
        return now - timedelta(seconds=parse_duration(text[4:]))
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return datetime.fromtimestamp(float(text), UTC)
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def prom_duration(seconds: float) -> str:
    """Seconds -> a duration PromQL accepts in a range selector (whole seconds, or ms below one)."""
    return f"{max(1, round(seconds))}s" if seconds >= 1 else f"{max(1, round(seconds * 1000))}ms"


@dataclass(frozen=True)
class Window:
    start: datetime
    end: datetime
    step_s: float  # $__interval: the query resolution
    scrape_s: float  # the scrape interval $__rate_interval is built on

    @property
    def range_s(self) -> float:
        return (self.end - self.start).total_seconds()

    def builtins(self) -> dict[str, str]:
        # Grafana's definition: a rate window must span at least four scrapes, and a step plus one scrape.
        rate_s = max(self.step_s + self.scrape_s, 4 * self.scrape_s)
        return {
            "__rate_interval": prom_duration(rate_s),
            "__interval": prom_duration(self.step_s),
            "__interval_ms": str(round(self.step_s * 1000)),
            "__range": prom_duration(self.range_s),
            "__range_s": str(round(self.range_s)),
            "__range_ms": str(round(self.range_s * 1000)),
        }


def auto_step(range_s: float, scrape_s: float) -> float:
    """Grafana-like auto interval: about POINTS_PER_PANEL points, never finer than a scrape, whole seconds."""
    return float(max(math.ceil(range_s / POINTS_PER_PANEL), math.ceil(scrape_s)))


def dashboard_variables(dashboard: dict, overrides: dict[str, str]) -> dict[str, str]:
    """Template variable values: --var first, else the variable's current value, else 'All' (its allValue or .*)."""
    values: dict[str, str] = {}
    for var in dashboard.get("templating", {}).get("list", []):
        name = var.get("name")
        if not name or var.get("type") == "datasource":
            continue
        if name in overrides:
            values[name] = overrides[name]
            continue
        current = var.get("current", {}).get("value")
        picked = current if isinstance(current, list) else [current] if current else []
        if not picked or "$__all" in picked:
            values[name] = var.get("allValue") or ".*"
        else:
            values[name] = "|".join(str(v) for v in picked)  # Grafana's regex formatting of a multi-value pick
    values.update({k: v for k, v in overrides.items() if k not in values})
    return values


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Replace $name, ${name}, ${name:format} and [[name]]; unknown names are left for Prometheus to reject."""

    def value(match: re.Match) -> str:
        name = next(g for g in match.groups() if g)
        return variables.get(name, match.group(0))

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", value, expr)


# -- Prometheus ------------------------------------------------------------------------------------------


@dataclass
class Series:
    labels: dict[str, str]
    times: np.ndarray  # (T,) datetime64 as matplotlib floats
    values: np.ndarray  # (T,) float; NaN where Prometheus had no value
    name: str = ""


class Prometheus:
    def __init__(self, url: str, timeout_s: float = 30.0):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def _get(self, path: str, params: dict[str, str] | None = None) -> dict:
        query = "?" + urllib.parse.urlencode(params) if params else ""
        try:
            with urllib.request.urlopen(self.url + path + query, timeout=self.timeout_s) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:  # 400/422 carry Prometheus' own explanation
            try:
                body = json.load(exc)
            except ValueError:
                raise RuntimeError(f"HTTP {exc.code} from {path}") from None
        if body.get("status") != "success":
            raise RuntimeError(body.get("error", "query failed"))
        return body["data"]

    def scrape_interval_s(self) -> float:
        """The global scrape interval from the server's loaded configuration, which $__rate_interval needs."""
        try:
            config = yaml.safe_load(self._get("/api/v1/status/config")["yaml"])
            return parse_duration(config.get("global", {}).get("scrape_interval", "15s"))
        except (OSError, RuntimeError, ValueError, KeyError, AttributeError):
            return DEFAULT_SCRAPE_S

    def query_range(self, expr: str, window: Window) -> list[Series]:
        data = self._get("/api/v1/query_range", {
            "query": expr,
            "start": f"{window.start.timestamp():.3f}",
            "end": f"{window.end.timestamp():.3f}",
            "step": f"{window.step_s:g}",
        })
        series = []
        for item in data["result"]:
            stamps = np.array([float(t) for t, _ in item["values"]])
            values = np.array([float(v) for _, v in item["values"]])  # float() reads NaN, +Inf, -Inf
            # A ratio over a window where the denominator did not move (x/0) is ±Inf; Grafana leaves
            # those points out of a graph, and so do we.
            values[np.isinf(values)] = np.nan
            series.append(Series(item["metric"], mdates.date2num(stamps.astype("datetime64[s]")), values))
        return series


# -- values and units --------------------------------------------------------------------------------------


def _number(value: float, decimals: int | None) -> str:
    if decimals is not None:
        return f"{value:,.{decimals}f}"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    # About three significant digits, without the trailing zeros Grafana leaves off too.
    text = f"{value:.1f}" if magnitude >= 10 else f"{value:.2f}" if magnitude >= 1 else f"{value:.3g}"
    return text.rstrip("0").rstrip(".") if "." in text and "e" not in text else text


def format_value(value: float, unit: str = "short", decimals: int | None = None) -> str:
    """A value in one of Grafana's units (the handful our dashboards use), roughly as Grafana shows it."""
    if value is None or not math.isfinite(value):
        return "N/A" if value is None or math.isnan(value) else ("∞" if value > 0 else "-∞")
    if unit == "percentunit":
        return _number(value * 100, decimals) + "%"
    if unit == "percent":
        return _number(value, decimals) + "%"
    if unit == "currencyUSD":
        return ("-$" if value < 0 else "$") + _number(abs(value), decimals)
    if unit in ("s", "ms"):
        seconds = value / 1000 if unit == "ms" else value
        if seconds == 0:
            return "0 s"
        for limit, scale, suffix in ((1e-3, 1e6, " µs"), (1, 1e3, " ms"), (60, 1, " s"), (3600, 1 / 60, " min")):
            if abs(seconds) < limit:
                return _number(seconds * scale, decimals) + suffix
        return _number(seconds / 3600, decimals) + " h"
    if unit == "none":
        return _number(value, decimals)
    suffix = {"reqps": " req/s", "ops": " ops/s"}.get(unit, "")
    for limit, scale, si in ((1e9, 1e9, " B"), (1e6, 1e6, " M"), (1e3, 1e3, " K")):
        if abs(value) >= limit:
            return _number(value / scale, decimals) + si + suffix
    return _number(value, decimals) + suffix


def reduce(values: np.ndarray, calc: str) -> float:
    """Grafana's reducers for stat-like panels; lastNotNull is its default."""
    finite = values[~np.isnan(values)]
    if finite.size == 0:
        return math.nan
    return {
        "lastNotNull": finite[-1], "last": values[-1], "first": finite[0], "firstNotNull": finite[0],
        "mean": finite.mean(), "max": finite.max(), "min": finite.min(), "sum": finite.sum(),
    }.get(calc, finite[-1])


def color(name: str | None) -> str:
    if not name:
        return THEME["text"]
    return NAMED_COLORS.get(name.split("-")[-1] if name.startswith(("dark-", "semi-dark-", "light-")) else name, name)


def threshold_color(value: float, defaults: dict) -> str:
    steps = defaults.get("thresholds", {}).get("steps") or [{"color": "green", "value": None}]
    chosen = steps[0]["color"]
    for step in steps[1:]:
        if step.get("value") is not None and math.isfinite(value) and value >= step["value"]:
            chosen = step["color"]
    return color(chosen)


def mapped(value: float, defaults: dict) -> tuple[str, str] | None:
    """A value mapping's (text, colour) for this value, if the panel maps it."""
    for mapping in defaults.get("mappings", []):
        if mapping.get("type") == "value" and math.isfinite(value):
            hit = mapping.get("options", {}).get(str(int(value)) if value == int(value) else str(value))
            if hit:
                return hit.get("text", str(value)), color(hit.get("color")) if hit.get("color") else threshold_color(value, defaults)
    return None


def legend(fmt: str, labels: dict[str, str], expr: str) -> str:
    """legendFormat with {{label}} filled in; '__auto' or empty shows the series' labels, as Grafana does."""
    if fmt and fmt != "__auto":
        return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)
    shown = {k: v for k, v in labels.items() if k != "__name__"}
    if shown:
        return "{" + ", ".join(f'{k}="{v}"' for k, v in shown.items()) + "}"
    return " ".join(expr.split())[:60]


def deaccumulate(series: list[Series]) -> list[Series]:
    """Cumulative `le` buckets -> per-bucket counts in bound order: what Grafana's 'heatmap' query format does."""

    def bound(s: Series) -> float:
        return float(s.labels.get("le", "inf").replace("+Inf", "inf"))

    ordered = sorted(series, key=bound)
    out, below = [], None
    for s in ordered:
        counts = s.values.copy() if below is None else s.values - below
        below = s.values
        out.append(Series(s.labels, s.times, np.clip(counts, 0, None), s.name))
    return out


# -- drawing -----------------------------------------------------------------------------------------------


@dataclass
class PanelData:
    series: list[Series] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def fetch(panel: dict, prometheus: Prometheus, window: Window, variables: dict[str, str]) -> PanelData:
    data = PanelData()
    for target in panel.get("targets", []):
        if target.get("hide") or not target.get("expr"):
            continue
        expr = substitute(target["expr"], variables)
        try:
            found = prometheus.query_range(expr, window)
        except (OSError, RuntimeError) as exc:
            data.errors.append(f"{target.get('refId', '?')}: {exc}")
            continue
        for s in found:
            s.name = legend(target.get("legendFormat", ""), s.labels, target["expr"])
        if target.get("format") == "heatmap":
            found = deaccumulate(found)
        data.series.extend(found)
    return data


def _style_axes(ax, window: Window) -> None:
    ax.set_facecolor(THEME["panel"])
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.tick_params(which="both", colors=THEME["muted"], labelsize=8, length=0)
    ax.grid(True, color=THEME["grid"], linewidth=0.6)
    ax.set_axisbelow(True)
    ax.set_xlim(mdates.date2num(window.start), mdates.date2num(window.end))
    locator = mdates.AutoDateLocator(minticks=3, maxticks=7, tz=UTC)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M", tz=UTC))


def _unit_axis(ax, unit: str) -> None:
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: format_value(v, unit)))


def _series_override(panel: dict, name: str) -> dict:
    props: dict = {}
    for override in panel.get("fieldConfig", {}).get("overrides", []):
        matcher = override.get("matcher", {})
        if matcher.get("id") == "byName" and matcher.get("options") == name:
            props.update({p["id"]: p["value"] for p in override.get("properties", [])})
    return props


def draw_timeseries(ax, panel: dict, data: PanelData, window: Window) -> None:
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    custom = defaults.get("custom", {})
    unit = defaults.get("unit", "short")
    _style_axes(ax, window)
    right, right_min = None, None
    width = window.step_s / 86400 * 0.9  # bar width in matplotlib date units (days)
    stacked = custom.get("stacking", {}).get("mode") == "normal"
    bottoms: dict[float, float] = {}
    handles = []
    for i, s in enumerate(data.series):
        props = _series_override(panel, s.name)
        target_ax = ax
        if props.get("custom.axisPlacement") == "right":
            if right is None:
                right = ax.twinx()
                right.tick_params(which="both", colors=THEME["muted"], labelsize=8, length=0)
                for spine in right.spines.values():
                    spine.set_visible(False)
                _unit_axis(right, props.get("unit", unit))
            right_min = props.get("min", right_min)
            target_ax = right
        tint = PALETTE[i % len(PALETTE)]
        if custom.get("drawStyle") == "bars":
            values = np.nan_to_num(s.values)
            base = np.array([bottoms.get(t, 0.0) for t in s.times]) if stacked else 0
            handle = target_ax.bar(s.times, values, width=width, bottom=base, color=tint, alpha=0.8, label=s.name)
            if stacked:
                bottoms.update(zip(s.times, values + base, strict=True))
        elif custom.get("lineInterpolation") == "stepAfter":
            (handle,) = target_ax.step(s.times, s.values, where="post", color=tint, linewidth=1.4, label=s.name)
        else:
            (handle,) = target_ax.plot(s.times, s.values, color=tint, linewidth=1.4, label=s.name)
            if custom.get("fillOpacity"):
                target_ax.fill_between(s.times, s.values, color=tint, alpha=custom["fillOpacity"] / 100, linewidth=0)
        handles.append(handle)
    if right is not None and right_min is not None:
        right.set_ylim(bottom=right_min)  # after plotting, so the top still follows the data
    if custom.get("thresholdsStyle", {}).get("mode") == "line":
        for step in defaults.get("thresholds", {}).get("steps", [])[1:]:
            if step.get("value") is not None:
                ax.axhline(step["value"], color=color(step["color"]), linestyle="--", linewidth=1, alpha=0.8)
    if custom.get("scaleDistribution", {}).get("type") == "log":
        finite = np.concatenate([s.values[np.isfinite(s.values) & (s.values > 0)] for s in data.series] or [np.array([])])
        if finite.size:
            ax.set_yscale("log")
    lo, hi = defaults.get("min"), defaults.get("max")
    if ax.get_yscale() == "linear":
        bottom, top = ax.get_ylim()
        bottom, top = bottom if lo is None else lo, top if hi is None else hi
        # A line sitting on a hard max (a 100% SLO share) would vanish into the frame: leave it a sliver.
        ax.set_ylim(bottom, top + (0.03 * (top - bottom) if hi is not None else 0))
    _unit_axis(ax, unit)
    if handles:
        # matplotlib fills legend columns first; Grafana reads left to right, so hand it the column-major order.
        ncol = min(len(handles), 4)
        handles = [h for k in range(ncol) for h in handles[k::ncol]]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0, -0.12), ncol=ncol,
                  fontsize=7.5, frameon=False, labelcolor=THEME["text"], handlelength=1.2, columnspacing=1.2)


def draw_stat(ax, panel: dict, data: PanelData, window: Window) -> None:
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    options = panel.get("options", {})
    calc = (options.get("reduceOptions", {}).get("calcs") or ["lastNotNull"])[0]
    ax.set_axis_off()
    n = len(data.series)
    show_names = n > 1 or options.get("textMode") == "value_and_name"
    for i, s in enumerate(data.series):
        value = reduce(s.values, calc)
        text, tint = mapped(value, defaults) or (
            format_value(value, defaults.get("unit", "short"), defaults.get("decimals")), threshold_color(value, defaults)
        )
        x0, x1 = i / n, (i + 1) / n
        centre = (x0 + x1) / 2
        size = 26 if n == 1 and len(text) <= 8 else 20 if len(text) <= 12 else 14
        ax.text(centre, 0.5 if not show_names else 0.42, text, ha="center", va="center", fontsize=size,
                color=tint, fontweight="bold", transform=ax.transAxes)
        if show_names:
            ax.text(centre, 0.82, s.name, ha="center", va="center", fontsize=8, color=THEME["muted"], transform=ax.transAxes)
        if options.get("graphMode", "area") == "area" and np.isfinite(s.values).sum() > 1:
            spark = ax.inset_axes([x0 + 0.02, 0.0, (x1 - x0) - 0.04, 0.28])
            spark.set_axis_off()
            spark.fill_between(s.times, np.nan_to_num(s.values), color=tint, alpha=0.25, linewidth=0)
            spark.plot(s.times, s.values, color=tint, linewidth=1)
            spark.set_xlim(mdates.date2num(window.start), mdates.date2num(window.end))


def draw_gauge(ax, panel: dict, data: PanelData, window: Window) -> None:
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    calc = (panel.get("options", {}).get("reduceOptions", {}).get("calcs") or ["lastNotNull"])[0]
    ax.set_axis_off()
    ax.set_aspect("equal")
    ax.set_xlim(-1.25, 1.25)
    ax.set_ylim(-0.45, 1.15)
    lo, hi = defaults.get("min", 0), defaults.get("max", 100 if defaults.get("unit") == "percent" else 1)
    value = reduce(data.series[0].values, calc)
    tint = threshold_color(value, defaults)
    # Threshold band on the outside, value arc inside, as Grafana draws it; 180° = min, 0° = max.
    steps = defaults.get("thresholds", {}).get("steps", [])
    bounds = [lo] + [s["value"] for s in steps[1:] if s.get("value") is not None] + [hi]
    for step, a, b in zip(steps, bounds, bounds[1:], strict=False):
        fa, fb = ((np.clip(v, lo, hi) - lo) / (hi - lo) for v in (a, b))
        ax.add_patch(Wedge((0, 0), 1.08, 180 - 180 * fb, 180 - 180 * fa, width=0.06, color=color(step["color"])))
    ax.add_patch(Wedge((0, 0), 1.0, 0, 180, width=0.25, color=THEME["border"]))
    if math.isfinite(value):
        frac = float(np.clip((value - lo) / (hi - lo), 0, 1))
        ax.add_patch(Wedge((0, 0), 1.0, 180 - 180 * frac, 180, width=0.25, color=tint))
    ax.text(0, 0.02, format_value(value, defaults.get("unit", "short"), defaults.get("decimals")), ha="center",
            va="center", fontsize=16, color=tint, fontweight="bold")
    if len(data.series) > 1:
        ax.text(0, -0.3, f"(first of {len(data.series)} series)", ha="center", fontsize=7, color=THEME["muted"])


def draw_bargauge(ax, panel: dict, data: PanelData, window: Window) -> None:
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    calc = (panel.get("options", {}).get("reduceOptions", {}).get("calcs") or ["lastNotNull"])[0]
    unit, decimals = defaults.get("unit", "short"), defaults.get("decimals")
    ax.set_axis_off()
    values = [reduce(s.values, calc) for s in data.series]
    finite = [v for v in values if math.isfinite(v)]
    top = defaults.get("max", max(finite, default=1) or 1)
    n = len(values)
    row = 1 / n
    for i, (s, value) in enumerate(zip(data.series, values, strict=True)):
        y = 1 - (i + 0.5) * row
        frac = float(np.clip(value / top, 0, 1)) if math.isfinite(value) and top else 0
        tint = threshold_color(value, defaults)
        ax.text(0.0, y, s.name, ha="left", va="center", fontsize=8, color=THEME["text"], transform=ax.transAxes)
        ax.add_patch(FancyBboxPatch((0.22, y - row * 0.3), 0.6, row * 0.6, boxstyle="square,pad=0",
                                    color=THEME["border"], transform=ax.transAxes))
        if frac:
            ax.add_patch(FancyBboxPatch((0.22, y - row * 0.3), 0.6 * frac, row * 0.6, boxstyle="square,pad=0",
                                        color=tint, alpha=0.9, transform=ax.transAxes))
        ax.text(0.84, y, format_value(value, unit, decimals), ha="left", va="center", fontsize=9, color=tint,
                fontweight="bold", transform=ax.transAxes)


def draw_heatmap(ax, panel: dict, data: PanelData, window: Window) -> None:
    _style_axes(ax, window)
    ax.grid(False)
    scheme = panel.get("options", {}).get("color", {}).get("scheme", "Oranges")
    # Reversed, as Grafana does on a dark background: few = dark, many = bright.
    cmap = plt.get_cmap(scheme if scheme in plt.colormaps() else "Oranges").reversed()
    times = np.unique(np.concatenate([s.times for s in data.series]))
    grid = np.full((len(data.series), len(times)), np.nan)  # (buckets, T)
    for row, s in enumerate(data.series):
        grid[row, np.searchsorted(times, s.times)] = s.values
    grid[grid == 0] = np.nan  # empty cells stay background, as in Grafana
    edges = np.append(times, times[-1] + window.step_s / 86400) if len(times) else times
    mesh = ax.pcolormesh(edges, np.arange(len(data.series) + 1), grid, cmap=cmap, shading="flat")
    ax.set_yticks(np.arange(len(data.series)) + 0.5, [s.name for s in data.series])
    bar = ax.figure.colorbar(mesh, ax=ax, pad=0.01, fraction=0.04)
    bar.ax.tick_params(colors=THEME["muted"], labelsize=7, length=0)
    bar.outline.set_visible(False)


DRAW = {"timeseries": draw_timeseries, "stat": draw_stat, "gauge": draw_gauge, "bargauge": draw_bargauge,
        "heatmap": draw_heatmap, "graph": draw_timeseries}


def render(dashboard: dict, prometheus: Prometheus, window: Window, variables: dict[str, str], out: Path,
           width_in: float = 20.0) -> Path:
    panels = [p for p in dashboard.get("panels", []) if p.get("type") != "row"]
    col_in = width_in / GRID_COLUMNS
    row_in = col_in * 0.45  # Grafana: 24 columns across ~1800 px, rows 30 px + margin
    header_in = 0.9
    rows = max((p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels), default=1)
    height_in = header_in + rows * row_in + 0.2
    fig = plt.figure(figsize=(width_in, height_in), facecolor=THEME["page"])

    picked = ", ".join(f"{k}={'All' if v == '.*' else v}" for k, v in variables.items())
    fig.text(0.01, 1 - 0.35 / height_in, dashboard.get("title", "dashboard"), fontsize=18, color=THEME["text"],
             fontweight="bold", va="center")
    fig.text(0.01, 1 - 0.7 / height_in,
             f"{window.start:%Y-%m-%d %H:%M:%S} → {window.end:%Y-%m-%d %H:%M:%S} UTC   ·   step {window.step_s:g}s   ·   "
             f"{picked or 'no variables'}", fontsize=10, color=THEME["muted"], va="center")

    gap = 0.06  # inches between panels
    for panel in panels:
        pos = panel["gridPos"]
        left = (pos["x"] * col_in + gap) / width_in
        top = (header_in + pos["y"] * row_in + gap) / height_in
        w = (pos["w"] * col_in - 2 * gap) / width_in
        h = (pos["h"] * row_in - 2 * gap) / height_in
        frame = fig.add_axes([left, 1 - top - h, w, h])
        frame.set_xticks([])
        frame.set_yticks([])
        frame.set_facecolor(THEME["panel"])
        for spine in frame.spines.values():
            spine.set_color(THEME["border"])
        title_h = 0.32 / (pos["h"] * row_in)
        frame.text(0.015, 1 - title_h / 2, panel.get("title", ""), transform=frame.transAxes, fontsize=10,
                   color=THEME["text"], fontweight="bold", va="center")

        data = fetch(panel, prometheus, window, variables | window.builtins())
        kind = panel.get("type", "timeseries")
        # Room for axis labels and the legend below a time axis; stat-like panels fill the frame.
        timed = kind in ("timeseries", "heatmap", "graph")
        legend_in = 0.18 * math.ceil(len(data.series) / 4) + 0.25 if kind != "heatmap" and timed else 0.3
        pad_left = 0.7 / width_in if timed else 0.1 / width_in
        inner_bottom = (legend_in if timed else 0.08) / (pos["h"] * row_in)
        right_axis = any(
            p.get("id") == "custom.axisPlacement" and p.get("value") == "right"
            for o in panel.get("fieldConfig", {}).get("overrides", []) for p in o.get("properties", [])
        )
        pad_right = (0.8 if right_axis else 0.25 if kind != "heatmap" else 0.1) / width_in
        inner = [left + pad_left, (1 - top - h) + h * inner_bottom, w - pad_left - pad_right,
                 h * (1 - inner_bottom - title_h * 1.1)]
        if data.errors and not data.series:
            frame.text(0.5, 0.45, "\n".join(e[:110] for e in data.errors[:3]), transform=frame.transAxes, ha="center",
                       va="center", fontsize=8, color=THEME["error"], wrap=True)
            continue
        if not data.series or all(np.isnan(s.values).all() for s in data.series):
            frame.text(0.5, 0.45, "No data", transform=frame.transAxes, ha="center", va="center", fontsize=12,
                       color=THEME["muted"])
            continue
        ax = fig.add_axes(inner)
        DRAW.get(kind, draw_timeseries)(ax, panel, data, window)
        if data.errors:
            frame.text(0.99, 1 - title_h / 2, "⚠ " + data.errors[0][:60], transform=frame.transAxes, ha="right",
                       va="center", fontsize=7, color=THEME["error"])

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, facecolor=THEME["page"])
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dashboards", nargs="+", type=Path, help="Grafana dashboard JSON files")
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus base URL")
    parser.add_argument("--start", default="now-1h", help="window start: ISO 8601 (naive = UTC), Unix time or now-30m")
    parser.add_argument("--end", default="now", help="window end, same forms")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for the PNGs (one per dashboard)")
    parser.add_argument("--step", help="query resolution, e.g. 15s (default: auto from the window and scrape interval)")
    parser.add_argument("--scrape-interval", help="scrape interval for $__rate_interval (default: read from Prometheus)")
    parser.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                        help="template variable value, e.g. model_name=ref-code-target (default: All)")
    parser.add_argument("--width", type=float, default=20.0, help="figure width in inches (100 dpi)")
    args = parser.parse_args(argv)

    now = datetime.now(UTC)
    start, end = parse_time(args.start, now), parse_time(args.end, now)
    if end <= start:
        parser.error("--end must be after --start")
    prometheus = Prometheus(args.prometheus)
    scrape_s = parse_duration(args.scrape_interval) if args.scrape_interval else prometheus.scrape_interval_s()
    step_s = parse_duration(args.step) if args.step else auto_step((end - start).total_seconds(), scrape_s)
    window = Window(start, end, step_s, scrape_s)
    overrides = dict(v.split("=", 1) for v in args.var)

    for path in args.dashboards:
        dashboard = json.loads(path.read_text())
        variables = dashboard_variables(dashboard, overrides)
        out = render(dashboard, prometheus, window, variables, args.out / f"{path.stem}.png", args.width)
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
