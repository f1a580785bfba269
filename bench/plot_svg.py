"""A line chart as SVG text, for the plots of BENCHMARKS.md: no plotting library, the same bytes every time.

A goal file of bench/results/current/ may carry a "plot" (bench.report renders and checks it):

    "plot": {"file": "bench/results/x.svg", "title": "...", "x_label": "...", "y_label": "...",
             "source": "bench/results/raw.json", "rows": "fid", "x": "network_calls", "y": "fid",
             "log_x": true, "log_y": true,
             "series": [{"name": "students", "where": {"sampler": "student"}}, ...]}

Each series is the rows of the raw file's list `rows` whose keys match `where`, as (x, y) points sorted by x.
"""

from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path
from typing import Any, Sequence

WIDTH, HEIGHT = 640, 400
LEFT, RIGHT, TOP, BOTTOM = 70, 170, 40, 50  # margins: axis labels left and below, the legend on the right
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")

Series = tuple[str, list[tuple[float, float]]]


def series_from(root: Path, plot: dict[str, Any]) -> list[Series]:
    """The plot's series read from its source file (see the module docstring); KeyError/ValueError if malformed."""
    rows = json.loads((root / plot["source"]).read_text(encoding="utf-8"))[plot["rows"]]
    out = []
    for spec in plot["series"]:
        points = sorted((float(r[plot["x"]]), float(r[plot["y"]])) for r in rows
                        if all(r.get(k) == v for k, v in spec.get("where", {}).items()))
        if not points:
            raise ValueError(f"series {spec['name']!r} matches no row of {plot['source']} {plot['rows']}")
        out.append((spec["name"], points))
    return out


def _scale(lo: float, hi: float, log: bool, size: float, flip: bool):
    f = math.log10 if log else (lambda v: v)
    a, b = f(lo), f(hi)
    span = (b - a) or 1.0

    def to_px(v: float) -> float:
        frac = (f(v) - a) / span
        return (1 - frac) * size if flip else frac * size
    return to_px


def _ticks(lo: float, hi: float, log: bool) -> list[float]:
    if log:
        return [10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)]
    step = 10 ** math.floor(math.log10((hi - lo) or 1.0))
    return [lo + i * step for i in range(int((hi - lo) / step) + 1)]


def _fmt(v: float) -> str:
    return f"{v:g}"


def line_chart(title: str, x_label: str, y_label: str, series: Sequence[Series], log_x: bool = True,
               log_y: bool = True) -> str:
    """The chart as an SVG document (text)."""
    xs = [x for _, pts in series for x, _ in pts]
    ys = [y for _, pts in series for _, y in pts]
    xt, yt = _ticks(min(xs), max(xs), log_x), _ticks(min(ys), max(ys), log_y)
    pw, ph = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    sx = _scale(xt[0], xt[-1], log_x, pw, False)
    sy = _scale(yt[0], yt[-1], log_y, ph, True)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
           f'<text x="{LEFT + pw / 2:.1f}" y="22" text-anchor="middle" font-size="14">{escape(title)}</text>',
           f'<g transform="translate({LEFT},{TOP})">',
           f'<rect width="{pw}" height="{ph}" fill="none" stroke="#444"/>']
    for v in xt:
        x = sx(v)
        out += [f'<line x1="{x:.1f}" y1="0" x2="{x:.1f}" y2="{ph}" stroke="#ddd"/>',
                f'<text x="{x:.1f}" y="{ph + 16}" text-anchor="middle">{_fmt(v)}</text>']
    for v in yt:
        y = sy(v)
        out += [f'<line x1="0" y1="{y:.1f}" x2="{pw}" y2="{y:.1f}" stroke="#ddd"/>',
                f'<text x="-6" y="{y + 4:.1f}" text-anchor="end">{_fmt(v)}</text>']
    out += [f'<text x="{pw / 2:.1f}" y="{ph + 36}" text-anchor="middle">{escape(x_label)}</text>',
            f'<text transform="translate(-52,{ph / 2:.1f}) rotate(-90)" text-anchor="middle">'
            f'{escape(y_label)}</text>']
    for i, (name, pts) in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>' for x, y in pts]
        ly = 10 + 18 * i
        out += [f'<line x1="{pw + 12}" y1="{ly}" x2="{pw + 32}" y2="{ly}" stroke="{colour}" stroke-width="2"/>',
                f'<text x="{pw + 36}" y="{ly + 4}">{escape(name)}</text>']
    out += ["</g>", "</svg>"]
    return "\n".join(out) + "\n"


def render(root: Path, plot: dict[str, Any]) -> str:
    """The SVG of a goal file's "plot" entry."""
    return line_chart(plot["title"], plot["x_label"], plot["y_label"], series_from(root, plot),
                      plot.get("log_x", True), plot.get("log_y", True))
