#!/usr/bin/env python3
"""Turns the connections benchmark's JSON (one file per stack) into a comparison table
(bench/results/connections.md, also printed) and a plot (bench/results/connections.png).

    python3 bench/report.py bench/results/connections-wsfleet.json bench/results/connections-node.json
"""
import json
import sys
from pathlib import Path


def load(path):
    return json.loads(Path(path).read_text())


def row(step):
    b = step["broadcast"]
    last = max(x["last_ms"] for x in b) if b else float("nan")
    rate = max(x["deliveries_per_s"] for x in b) if b else float("nan")
    lat = step["sustained"]["latency_ms"]
    return {
        "held": step["held"],
        "failed": step["failed"],
        "establish_s": step["establish_seconds"],
        "server_b": step["server_bytes_per_connection"],
        "kernel_b": step["kernel_slab_bytes_per_connection"],
        "idle_cpu": step["idle_cpu_percent_of_a_core"],
        "fanout_ms": last,
        "fanout_rate": rate,
        "p50": lat["p50"],
        "p99": lat["p99"],
        "p999": lat["p999"],
    }


def table(docs):
    lines = [
        "| stack | connections | failed | establish (s) | server B/conn | kernel B/conn | idle CPU (% core) | broadcast to all (ms) | deliveries/s | p50 / p99 / p99.9 (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d in docs:
        for s in d["steps"]:
            r = row(s)
            lines.append(
                f"| {d['stack']} | {r['held']:,} | {r['failed']} | {r['establish_s']:.1f} | {r['server_b']:,.0f} | {r['kernel_b']:,.0f} | "
                f"{r['idle_cpu']:.1f} | {r['fanout_ms']:.0f} | {r['fanout_rate']:,.0f} | {r['p50']:.1f} / {r['p99']:.1f} / {r['p999']:.1f} |"
            )
        lines.append(f"| {d['stack']} | stopped: {d['stopped']} | | | | | | | | |")
    # Ratios at the largest count both stacks reached.
    if len(docs) == 2:
        a = {s["target"]: row(s) for s in docs[0]["steps"]}
        b = {s["target"]: row(s) for s in docs[1]["steps"]}
        common = sorted(set(a) & set(b))
        if common:
            n = common[-1]
            x, y = a[n], b[n]
            lines += [
                "",
                f"Ratios at {n:,} connections ({docs[1]['stack']} / {docs[0]['stack']}; above 1 means {docs[0]['stack']} is better):",
                "",
                f"- server memory per connection: {y['server_b'] / x['server_b']:.2f}x",
                f"- time to establish: {y['establish_s'] / x['establish_s']:.2f}x",
                f"- one broadcast to every connection: {y['fanout_ms'] / x['fanout_ms']:.2f}x",
                f"- deliveries per second in that broadcast: {x['fanout_rate'] / y['fanout_rate']:.2f}x",
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
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for d in docs:
        rows = [row(s) for s in d["steps"]]
        xs = [r["held"] for r in rows]
        ax1.plot(xs, [r["server_b"] / 1024 for r in rows], marker="o", label=d["stack"])
        ax2.plot(xs, [r["fanout_ms"] for r in rows], marker="o", label=d["stack"])
    ax1.set(xlabel="connections held", ylabel="server KiB per connection", title="Server memory per connection")
    ax2.set(xlabel="connections held", ylabel="ms until the last connection has it", title="One broadcast to every connection")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.legend()
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
