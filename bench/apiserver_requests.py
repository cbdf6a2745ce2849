#!/usr/bin/env python3
"""The API server's requests between two scrapes of its /metrics (`apiserver_request_total`),
for bench/operator.sh.

    python3 bench/apiserver_requests.py BEFORE AFTER SECONDS

BEFORE and AFTER are `kubectl get --raw /metrics` outputs (only the `apiserver_request_total`
lines are read). Prints one JSON object: requests per second by verb (every client of the API
server), writes by resource, and the writes to the kinds the operator writes
(`operator_kinds_writes`), which in a quiet cluster only the operator writes.
"""
import json
import re
import sys
from collections import Counter
from pathlib import Path

LINE = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$")
LABEL = re.compile(r'(\w+)="([^"]*)"')
READS = {"GET", "LIST", "WATCH", "CONNECT"}
# What the operator writes: its custom resource (status), its children, and events.
OPERATOR_KINDS = {"websocketclusters", "deployments", "services", "poddisruptionbudgets", "daemonsets", "events"}


def counts(path):
    """(verb, resource, subresource) -> requests so far."""
    out = Counter()
    for line in Path(path).read_text().splitlines():
        m = LINE.match(line)
        if not m:
            continue
        labels = dict(LABEL.findall(m["labels"]))
        out[(labels.get("verb", ""), labels.get("resource", ""), labels.get("subresource", ""))] += float(m["value"])
    return out


def main(before, after, seconds):
    seconds = float(seconds)
    a, b = counts(before), counts(after)
    delta = {k: b[k] - a.get(k, 0) for k in b if b[k] - a.get(k, 0) > 0}
    by_verb = Counter()
    by_request = Counter()
    writes = Counter()
    operator_writes = Counter()
    for (verb, resource, sub), n in delta.items():
        by_verb[verb] += n
        name = resource + (f"/{sub}" if sub else "")
        by_request[f"{verb} {name}"] += n
        if verb in READS:
            continue
        writes[f"{verb} {name}"] += n
        if resource in OPERATOR_KINDS:
            operator_writes[f"{verb} {name}"] += n
    total = sum(by_verb.values())
    doc = {
        "seconds": round(seconds, 2),
        "requests": int(total),
        "requests_per_s": round(total / seconds, 2) if seconds > 0 else None,
        "per_s_by_verb": {v: round(n / seconds, 2) for v, n in sorted(by_verb.items())} if seconds > 0 else {},
        "by_request": {k: int(n) for k, n in sorted(by_request.items())},
        "writes": int(sum(writes.values())),
        "writes_by_resource": {k: int(n) for k, n in sorted(writes.items())},
        "operator_kinds_writes": int(sum(operator_writes.values())),
        "operator_kinds_writes_by_resource": {k: int(n) for k, n in sorted(operator_writes.items())},
    }
    print(json.dumps(doc))


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
