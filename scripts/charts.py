#!/usr/bin/env python3
"""Throughput-against-latency charts (SVG) from the benchmarks' JSON.

    cargo bench --bench wal -- --only SWEEP --json target/wal-sweep.json
    cargo bench --bench node -- --only SWEEP --json target/node-sweep.json
    python3 scripts/charts.py target/wal-sweep.json target/node-sweep.json

Writes docs/charts/wal-throughput-latency.svg (the WAL against raft-engine
and okaywal, by writers) and docs/charts/node-throughput-latency.svg (the
node over HTTP, by connections). Each point is one concurrency level: x is
throughput, y is latency (p50 dashed, p99 solid, log scale). Only the
standard library is used, so it runs wherever the benchmarks do.
"""

import json
import math
import os
import sys

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
W, H = 760, 460
LEFT, RIGHT, TOP, BOTTOM = 80, 220, 50, 60


def load(path):
    with open(path) as f:
        data = json.load(f)
    # benches/node.rs writes several kinds of entries; keep the sweep's.
    return [p for p in data if p.get("id", "SWEEP") == "SWEEP"]


def nice_ticks(lo, hi, n=5):
    span = hi - lo
    step = 10 ** math.floor(math.log10(span / n)) if span > 0 else 1
    for m in (1, 2, 5, 10):
        if span / (step * m) <= n:
            step *= m
            break
    start = math.floor(lo / step) * step
    ticks = []
    t = start
    while t <= hi + 1e-9:
        if t >= lo - 1e-9:
            ticks.append(t)
        t += step
    return ticks


def chart(points, title, unit, out):
    systems = []
    for p in points:
        if p["system"] not in systems:
            systems.append(p["system"])
    xmax = max(p["ops_per_sec"] for p in points) * 1.1
    lat = [v for p in points for v in (p["p50_ms"], p["p99_ms"]) if v > 0]
    ymin = 10 ** math.floor(math.log10(min(lat)))
    ymax = 10 ** math.ceil(math.log10(max(lat)))
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def x(v):
        return LEFT + pw * v / xmax

    def y(v):
        v = max(v, ymin)
        return TOP + ph * (1 - (math.log10(v) - math.log10(ymin)) / (math.log10(ymax) - math.log10(ymin)))

    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{LEFT}" y="28" font-size="15" font-weight="bold">{title}</text>',
        f'<line x1="{LEFT}" y1="{TOP + ph}" x2="{LEFT + pw}" y2="{TOP + ph}" stroke="black"/>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + ph}" stroke="black"/>',
        f'<text x="{LEFT + pw / 2}" y="{H - 15}" text-anchor="middle">throughput (ops/s)</text>',
        f'<text x="20" y="{TOP + ph / 2}" text-anchor="middle" transform="rotate(-90 20 {TOP + ph / 2})">'
        "ack latency (ms, log)</text>",
    ]
    for t in nice_ticks(0, xmax):
        svg.append(f'<line x1="{x(t)}" y1="{TOP + ph}" x2="{x(t)}" y2="{TOP + ph + 5}" stroke="black"/>')
        svg.append(f'<text x="{x(t)}" y="{TOP + ph + 18}" text-anchor="middle">{int(t):,}</text>')
    decade = ymin
    while decade <= ymax * 1.0001:
        svg.append(f'<line x1="{LEFT}" y1="{y(decade)}" x2="{LEFT + pw}" y2="{y(decade)}" stroke="#ddd"/>')
        svg.append(f'<text x="{LEFT - 6}" y="{y(decade) + 4}" text-anchor="end">{decade:g}</text>')
        decade *= 10
    for i, system in enumerate(systems):
        color = COLORS[i % len(COLORS)]
        mine = sorted((p for p in points if p["system"] == system), key=lambda p: p["concurrency"])
        for key, dash in (("p99_ms", ""), ("p50_ms", ' stroke-dasharray="5,4"')):
            path = " ".join(f"{x(p['ops_per_sec']):.1f},{y(p[key]):.1f}" for p in mine)
            svg.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        for p in mine:
            svg.append(f'<circle cx="{x(p["ops_per_sec"]):.1f}" cy="{y(p["p99_ms"]):.1f}" r="3.5" fill="{color}"/>')
            svg.append(
                f'<text x="{x(p["ops_per_sec"]) + 5:.1f}" y="{y(p["p99_ms"]) - 6:.1f}" fill="{color}" '
                f'font-size="10">{p["concurrency"]}</text>'
            )
        ly = TOP + 20 + 22 * i
        svg.append(f'<line x1="{W - RIGHT + 15}" y1="{ly}" x2="{W - RIGHT + 40}" y2="{ly}" stroke="{color}" stroke-width="2"/>')
        svg.append(f'<text x="{W - RIGHT + 46}" y="{ly + 4}">{system}</text>')
    ly = TOP + 30 + 22 * len(systems)
    svg.append(f'<text x="{W - RIGHT + 15}" y="{ly}" fill="#555">solid: p99, dashed: p50</text>')
    svg.append(f'<text x="{W - RIGHT + 15}" y="{ly + 16}" fill="#555">labels: {unit}</text>')
    svg.append("</svg>")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write("\n".join(svg) + "\n")
    print(f"wrote {out}")


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    wal, node = load(sys.argv[1]), load(sys.argv[2])
    chart(wal, "WAL: 4 KiB sync appends, one log", "writers", "docs/charts/wal-throughput-latency.svg")
    chart(node, "Node: HTTP PUT 4 KiB over 8 partitions", "connections", "docs/charts/node-throughput-latency.svg")


if __name__ == "__main__":
    main()
