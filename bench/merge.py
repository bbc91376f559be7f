#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0
"""Adds a kvcache_bench run, or the serve example's reports, to bench/results/results.json.

usage: merge.py RESULTS.json benchmarks RUN.json replace|merge
         replace: RESULTS becomes RUN (a run of every benchmark);
         merge: RUN's benchmarks replace those of the same name in RESULTS, in place, new ones
         come last, the others stay (a run limited by --benchmark_filter); RUN's context
         replaces RESULTS' context key by key.
       merge.py RESULTS.json serve B=REPORT.json...
         RESULTS["serve"] becomes the list of serve's --json reports, one per --max-batch B:
         [{"max_batch": B, "report": {...}}, ...]. The benchmarks are kept.
"""
import json
import os
import sys


def read(path):
    with open(path) as f:
        return json.load(f)


def write(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def run_name(b):
    return b.get("run_name", b["name"])


def merge_benchmarks(old, run):
    groups = {}
    for b in run["benchmarks"]:
        groups.setdefault(run_name(b), []).append(b)
    merged, placed = [], set()
    for b in old.get("benchmarks", []):
        name = run_name(b)
        if name not in groups:
            merged.append(b)
        elif name not in placed:
            merged.extend(groups[name])
            placed.add(name)
    for name, group in groups.items():
        if name not in placed:
            merged.extend(group)
    out = dict(old)
    out["context"] = {**old.get("context", {}), **run.get("context", {})}
    out["benchmarks"] = merged
    return out


def main():
    if len(sys.argv) < 4 or sys.argv[2] not in ("benchmarks", "serve"):
        sys.exit(__doc__)
    results = sys.argv[1]
    old = read(results) if os.path.exists(results) else {}
    if sys.argv[2] == "benchmarks":
        if len(sys.argv) != 5 or sys.argv[4] not in ("replace", "merge"):
            sys.exit(__doc__)
        run = read(sys.argv[3])
        if sys.argv[4] == "replace" or not old:
            out = dict(run)
            if "serve" in old:
                out["serve"] = old["serve"]
        else:
            out = merge_benchmarks(old, run)
    else:
        reports = []
        for arg in sys.argv[3:]:
            batch, sep, path = arg.partition("=")
            if not sep or not batch.isdigit():
                sys.exit("merge.py: expected B=REPORT.json, got %r" % arg)
            try:
                report = read(path)
            except (OSError, ValueError) as e:
                sys.exit("merge.py: serve's report for --max-batch %s is not JSON: %s" % (batch, e))
            reports.append({"max_batch": int(batch), "report": report})
        out = dict(old)
        out["serve"] = reports
    write(results, out)


if __name__ == "__main__":
    main()
