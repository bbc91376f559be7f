#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0
"""Turns kvcache_bench's JSON output into PNG plots and a Markdown table of medians.

usage: plot.py RESULTS.json OUT_DIR
Writes OUT_DIR/decode_step.png, append_concat.png, decode_attention.png and prints the table.
"""
import json
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TO_SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}


def load(path):
    with open(path) as f:
        data = json.load(f)
    runs = {}
    has_aggregates = any(b.get("run_type") == "aggregate" for b in data["benchmarks"])
    for b in data["benchmarks"]:
        if has_aggregates:
            if b.get("aggregate_name") != "median":
                continue
            name = b["run_name"]
        else:
            name = b["name"]
        runs[name] = b
    return data["context"], runs


def seconds(b):
    return b["real_time"] * TO_SECONDS[b["time_unit"]]


def series(runs, prefix):
    """{ctx: benchmark} for names prefix/<ctx>, sorted by ctx."""
    out = {}
    for name, b in runs.items():
        m = re.fullmatch(re.escape(prefix) + r"/(\d+)(?:/real_time)?", name)
        if m:
            out[int(m.group(1))] = b
    return dict(sorted(out.items()))


def plot_latency(runs, out_dir):
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for mode, style in (("cached", "o-"), ("uncached", "s--")):
        s = series(runs, "decode_step/" + mode)
        if s:
            ax.plot(list(s), [seconds(b) * 1e3 for b in s.values()], style, label=mode)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("time per generated token (ms)")
    ax.set_title("tiny decoder: one more token at context n")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir + "/decode_step.png", dpi=120)


def plot_append(runs, out_dir):
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for kind, style in (("append", "o-"), ("concat", "s--")):
        s = series(runs, kind)
        if s:
            ax.plot(list(s), [seconds(b) * 1e6 for b in s.values()], style, label=kind)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens already cached")
    ax.set_ylabel("time to add one token (us)")
    ax.set_title("one layer, 8 kv heads x 128, f32")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir + "/append_concat.png", dpi=120)


def plot_attention(context, runs, out_dir):
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    names = sorted({m.group(1) for n in runs
                    for m in [re.fullmatch(r"decode_attention/(\w+)/\d+(?:/real_time)?", n)] if m})
    for dtype in names:
        s = series(runs, "decode_attention/" + dtype)
        ax.plot(list(s), [b["bytes_per_second"] / 1e9 for b in s.values()], "o-", label=dtype)
    # The triad measured side by side with the long contexts, else the one from start-up.
    side = [b["triad_GBps"] for n, b in runs.items() if n.startswith("decode_attention/") and "triad_GBps" in b
            and int(re.search(r"/(\d+)", n[len("decode_attention/"):]).group(1)) >= 8192]
    triad = sorted(side)[len(side) // 2] if side else float(context.get("triad_bytes_per_second", 0)) / 1e9
    if triad:
        ax.axhline(triad, color="k", linestyle=":", label="triad bandwidth (%.1f GB/s)" % triad)
        ax.axhline(0.8 * triad, color="grey", linestyle=":", label="80% of triad")
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("K and V read (GB/s)")
    ax.set_title("decode attention, 32 q / 8 kv heads x 128, %s threads" % context.get("threads", "?"))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir + "/decode_attention.png", dpi=120)


def fmt_time(sec):
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if sec >= scale:
            return "%.3g %s" % (sec / scale, unit)
    return "%.3g ns" % (sec / 1e-9)


def table(context, runs):
    triad = float(context.get("triad_bytes_per_second", 0))
    print("| benchmark | median time | throughput | label |")
    print("| --- | --- | --- | --- |")
    for name, b in runs.items():
        if "bytes_per_second" in b:
            thr = "%.2f GB/s" % (b["bytes_per_second"] / 1e9)
            if "of_triad" in b:
                thr += " (%.0f%% of triad)" % (100 * b["of_triad"])
        elif "items_per_second" in b:
            thr = "%.4g items/s" % b["items_per_second"]
        else:
            thr = ""
        print("| `%s` | %s | %s | %s |" % (name, fmt_time(seconds(b)), thr, b.get("label", "")))


def ratio(runs, a, b):
    a, b = (x if x in runs else x + "/real_time" for x in (a, b))
    if a in runs and b in runs:
        return seconds(runs[a]) / seconds(runs[b])
    return float("nan")


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    context, runs = load(sys.argv[1])
    out_dir = sys.argv[2]
    plot_latency(runs, out_dir)
    plot_append(runs, out_dir)
    plot_attention(context, runs, out_dir)
    table(context, runs)
    print()
    print("decode_step uncached/cached at 2048: %.0fx" % ratio(runs, "decode_step/uncached/2048", "decode_step/cached/2048"))
    print("append 16384/256: %.2fx; concat 16384/256: %.1fx" % (
        ratio(runs, "append/16384", "append/256"), ratio(runs, "concat/16384", "concat/256")))
    f32 = runs.get("decode_attention/f32/32768/real_time")
    for dtype in ("f32", "f16", "bf16", "int8", "int4"):
        b = runs.get("decode_attention/%s/32768/real_time" % dtype)
        if b:
            print("decode_attention/%s/32768: %.3g ms, %.2f GB/s = %.0f%% of the triad beside it (%.2f GB/s)%s" % (
                dtype, seconds(b) * 1e3, b["bytes_per_second"] / 1e9, 100 * b["of_triad"], b["triad_GBps"],
                "; %.2fx faster than f32" % (seconds(f32) / seconds(b)) if f32 and dtype != "f32" else ""))


if __name__ == "__main__":
    main()
