#!/usr/bin/env python3
"""Turns the connections benchmark's JSON (one file per run) into a comparison table
(bench/results/connections.md, also printed) and a plot (bench/results/connections.png).
The first two files are compared (ratios at the largest connection count both reached);
any further file (e.g. the road to a million) only adds rows and points.

    python3 bench/report.py results/connections-wsfleet.json results/connections-node.json [more.json ...]
"""
import json
import sys
from pathlib import Path


def load(path):
    return json.loads(Path(path).read_text())


def label(doc):
    return f"{doc['stack']} ({doc['servers']} processes)"


def row(step):
    b = step["broadcast"]
    burst = step.get("burst", {})
    lat = step["sustained"]["latency_ms"]
    return {
        "held": step["held"],
        "failed": step["failed"],
        "establish_s": step["establish_seconds"],
        "server_b": step["server_bytes_per_connection"],
        "client_b": step.get("client_bytes_per_connection", float("nan")),
        "kernel_b": step["kernel_slab_bytes_per_connection"],
        "idle_cpu": step["idle_cpu_percent_of_a_core"],
        "fanout_ms": max(x["last_ms"] for x in b) if b else float("nan"),
        "fanout_rate": max(x["deliveries_per_s"] for x in b) if b else float("nan"),
        "burst_rate": burst.get("deliveries_per_s", float("nan")),
        "burst_range": [x["deliveries_per_s"] for x in step.get("bursts", [burst])],
        "burst_lost": sum(x.get("expected", 0) - x.get("deliveries", 0) for x in step.get("bursts", [burst])),
        "fpw": burst.get("frames_per_write"),
        # From the first broadcast's first delivery to the last one's: how spread out the
        # burst's publishes reached the fleet (older results do not have it).
        "spread_ms": burst.get("arrival_spread_ms"),
        # Server CPU per delivery in the median burst (µs): what a delivery costs, whatever the timing.
        "cpu_us": burst["cpu_seconds"]["servers"] / max(burst["deliveries"], 1) * 1e6 if "cpu_seconds" in burst else float("nan"),
        "p50": lat["p50"],
        "p99": lat["p99"],
        "p999": lat["p999"],
    }


def table(docs):
    lines = [
        "| run | connections | failed | establish (s) | server B/conn | client B/conn | kernel B/conn | idle CPU (% core) "
        "| one broadcast to all (ms) | its deliveries/s | burst deliveries/s: median (min-max; lost) | server CPU µs per delivery | frames per write | burst arrival spread (ms) | steady p50 / p99 / p99.9 (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d in docs:
        for s in d["steps"]:
            r = row(s)
            fpw = f"{r['fpw']:.1f}" if r["fpw"] else "-"
            spread = f"{r['spread_ms']:.0f}" if r["spread_ms"] is not None else "-"
            lines.append(
                f"| {label(d)} | {r['held']:,} | {r['failed']} | {r['establish_s']:.1f} | {r['server_b']:,.0f} | {r['client_b']:,.0f} | "
                f"{r['kernel_b']:,.0f} | {r['idle_cpu']:.1f} | {r['fanout_ms']:,.0f} | {r['fanout_rate']:,.0f} | "
                f"{r['burst_rate']:,.0f} ({min(r['burst_range']):,.0f}-{max(r['burst_range']):,.0f}; {r['burst_lost']:,}) | {r['cpu_us']:.2f} | {fpw} | {spread} | "
                f"{r['p50']:.0f} / {r['p99']:.0f} / {r['p999']:.0f} |"
            )
        lines.append(f"| {label(d)} | stopped: {d['stopped']} | | | | | | | | | | | | | |")
    if len(docs) >= 2:
        a = {s["target"]: row(s) for s in docs[0]["steps"]}
        b = {s["target"]: row(s) for s in docs[1]["steps"]}
        common = sorted(set(a) & set(b))
        if common:
            n = common[-1]
            x, y = a[n], b[n]
            lines += [
                "",
                f"Burst fan-out ratio ({docs[0]['stack']} / {docs[1]['stack']}, medians) at each step: "
                + ", ".join(f"{k:,}: {a[k]['burst_rate'] / b[k]['burst_rate']:.1f}x" for k in common),
                "",
                f"Ratios at {n:,} connections ({docs[1]['stack']} / {docs[0]['stack']}; above 1 means {docs[0]['stack']} is better):",
                "",
                f"- burst fan-out, deliveries per second (medians): {x['burst_rate'] / y['burst_rate']:.1f}x "
                f"(worst wsfleet burst against the best baseline burst: {min(x['burst_range']) / max(y['burst_range']):.1f}x)",
                f"- server CPU per delivery in a burst: {y['cpu_us'] / x['cpu_us']:.1f}x",
                f"- one broadcast to every connection, deliveries per second: {x['fanout_rate'] / y['fanout_rate']:.2f}x",
                f"- server memory per connection: {y['server_b'] / x['server_b']:.2f}x",
                f"- time to establish: {y['establish_s'] / x['establish_s']:.2f}x",
                f"- steady-rate latency p99: {y['p99'] / x['p99']:.2f}x",
            ]
    return "\n".join(lines)


def plot(docs, out):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing (pip install matplotlib): no plot", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for d in docs:
        rows = [row(s) for s in d["steps"]]
        xs = [r["held"] for r in rows]
        axes[0].plot(xs, [r["server_b"] / 1024 for r in rows], marker="o", label=label(d))
        axes[1].plot(xs, [r["burst_rate"] / 1e6 for r in rows], marker="o", label=label(d))
        axes[2].plot(xs, [r["p99"] for r in rows], marker="o", label=label(d))
    axes[0].set(xlabel="connections held", ylabel="server KiB per connection", title="Server memory per connection")
    axes[1].set(xlabel="connections held", ylabel="million deliveries per second", title="Burst fan-out through Redis")
    axes[2].set(xlabel="connections held", ylabel="ms (publish to deliver, p99)", title="Latency under a steady broadcast rate")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"plot: {out}")


def main():
    docs = [load(p) for p in sys.argv[1:]]
    text = table(docs)
    print(text)
    Path("bench/results/connections.md").write_text(text + "\n")
    plot(docs, "bench/results/connections.png")


if __name__ == "__main__":
    main()
