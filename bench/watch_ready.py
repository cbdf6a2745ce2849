#!/usr/bin/env python3
"""Follows the ramp of bench/operator.sh through two watches (kubectl get --watch), not polls.

A LIST of a thousand WebSocketClusters and a thousand Deployments every two seconds cost the
API server and kubectl most of a core on a 2-core machine, the same cores the operator and the
control plane under test use. A watch sends each change once.

    watch_ready.py CLUSTERS REPLICAS NS_PREFIX LABEL TIMEOUT_S T0_MS

Counts, by name, the clusters with a status, the server Deployments with REPLICAS ready
replicas and the clusters whose Ready condition is True, and prints one JSON object on stdout:
{"with_status": s, "deployments": s, "ready": s, "rows": [[s, with_status, deployments, ready], ...]}
(seconds since T0_MS; null for a count that never reached CLUSTERS before TIMEOUT_S). A row
every 2 s; progress on stderr every 10 s. Each watch is restarted if it ends (at most 20 times);
every wait is bounded by TIMEOUT_S.
"""
import json
import os
import selectors
import subprocess
import sys
import time

clusters, replicas, ns_prefix, label, timeout_s, t0_ms = sys.argv[1:7]
clusters, replicas, timeout_s, t0 = int(clusters), int(replicas), float(timeout_s), int(t0_ms) / 1000

WATCHES = {
    "wsc": ["wsc", "-l", label,
            "-o", 'jsonpath={.metadata.namespace}/{.metadata.name} '
                  '{.status.conditions[?(@.type=="Ready")].status}{"\\n"}'],
    "deploy": ["deployments", "-l",
               "app.kubernetes.io/managed-by=wsfleet-operator,app.kubernetes.io/component=server",
               "-o", 'jsonpath={.metadata.namespace}/{.metadata.name} {.status.readyReplicas}{"\\n"}'],
}
state = {"wsc": {}, "deploy": {}}
sel = selectors.DefaultSelector()
restarts = 0


def start(kind):
    proc = subprocess.Popen(["kubectl", "--request-timeout=0", "get", "-A", "--watch"] + WATCHES[kind],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
    sel.register(proc.stdout, selectors.EVENT_READ, (kind, proc))
    return proc


def counts():
    wsc = state["wsc"].values()
    with_status = sum(1 for ready in wsc if ready)
    ready = sum(1 for ready in wsc if ready == "True")
    deployments = sum(1 for n in state["deploy"].values() if n >= replicas)
    return with_status, deployments, ready


procs = [start(kind) for kind in WATCHES]
reached = {"with_status": None, "deployments": None, "ready": None}
rows = []
next_row = next_report = time.time()
try:
    while time.time() - t0 < timeout_s:
        for key, _ in sel.select(timeout=0.5):
            kind, proc = key.data
            line = key.fileobj.readline()
            if not line:
                sel.unregister(key.fileobj)
                proc.wait(timeout=10)
                restarts += 1
                if restarts > 20:
                    raise SystemExit("the watches keep ending; giving up")
                procs.append(start(kind))
                continue
            name, _, rest = line.rstrip("\n").partition(" ")
            if not name.startswith(ns_prefix):
                continue
            if kind == "wsc":
                state["wsc"][name] = rest.strip()
            else:
                state["deploy"][name] = int(rest) if rest.strip().isdigit() else 0
        now = time.time()
        secs = round(now - t0, 1)
        with_status, deployments, ready = counts()
        for what, n in (("with_status", with_status), ("deployments", deployments), ("ready", ready)):
            if reached[what] is None and n >= clusters:
                reached[what] = secs
        if now >= next_row or reached["ready"] is not None:
            rows.append([secs, with_status, deployments, ready])
            next_row = now + 2
        if now >= next_report:
            print(f"[bench-operator] {secs}s: {with_status} with a status, {deployments} server Deployments "
                  f"ready, {ready} of {clusters} Ready", file=sys.stderr, flush=True)
            next_report = now + 10
        if reached["ready"] is not None:
            break
finally:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()

json.dump({**reached, "rows": rows}, sys.stdout)
print()
