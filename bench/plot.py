#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0
"""Turns kvcache_bench's JSON output into PNG plots and a Markdown table of medians.

usage: plot.py RESULTS.json OUT_DIR
Writes OUT_DIR/decode_step.png, append_concat.png, decode_attention.png (GB/s by context per
format, against the read bandwidth beside it), batch_decode.png and,
when RESULTS.json holds the serve example's reports (bench/merge.py), serve_throughput.png and
serve_memory.png; prints the table.
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
    return data, runs


def seconds(b):
    """The time Google Benchmark measures the benchmark by: wall clock for those run on the
    pool (names ending in /real_time) or timed by hand (/manual_time), else the CPU time of the
    calling thread, as its items/s are; on a shared machine that keeps out the time the thread
    waits for a core."""
    name = b.get("run_name", b["name"])
    key = "real_time" if name.endswith(("/real_time", "/manual_time")) else "cpu_time"
    return b[key] * TO_SECONDS[b["time_unit"]]


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

    # The roofline: the read bandwidth measured beside the contexts far beyond the caches.
    read = read_bandwidth(context, runs, "decode_attention/")
    if read:
        ax.axhline(read, color="k", linestyle=":", label="read bandwidth (%.1f GB/s)" % read)
        ax.axhline(0.85 * read, color="grey", linestyle=":", label="85% of read")
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("K and V read (GB/s)")
    ax.set_title("decode attention, 32 q / 8 kv heads x 128, %s threads" % context.get("threads", "?"))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir + "/decode_attention.png", dpi=120)


def read_bandwidth(context, runs, prefix, min_bytes=128 << 20):
    """GB/s: the median of the read passes measured beside the benchmarks under `prefix` that
    read at least min_bytes per call (several times the last level cache), else the read
    bandwidth measured at start-up."""
    side = [b["read_GBps"] for n, b in runs.items() if n.startswith(prefix) and "read_GBps" in b
            and b["bytes_per_second"] * seconds(b) >= min_bytes]
    if side:
        return sorted(side)[len(side) // 2]
    return float(context.get("read_bytes_per_second", 0)) / 1e9


def plot_batch_decode(context, runs, out_dir):
    batches = sorted({int(m.group(1)) for n in runs
                      for m in [re.fullmatch(r"paged_decode/f32/b(\d+)/\d+(?:/real_time)?", n)] if m})
    if not batches:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for batch in batches:
        s = series(runs, "paged_decode/f32/b%d" % batch)
        ax.plot(list(s), [b["bytes_per_second"] / 1e9 for b in s.values()], "o-",
                label="batch %d" % batch)
    read = read_bandwidth(context, runs, "paged_decode/")
    if read:
        ax.axhline(read, color="k", linestyle=":", label="read bandwidth (%.1f GB/s)" % read)
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("context length per sequence (tokens)")
    ax.set_ylabel("K and V read (GB/s)")
    ax.set_title("batched decode, paged (16 tokens, interleaved), 32 q / 8 kv heads x 128, f32,\n"
                 "%s threads" % context.get("threads", "?"), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir + "/batch_decode.png", dpi=120)


def find_number(report, names, pattern):
    """The first of `names`, else the first key matching `pattern`, in serve's report or the
    dictionaries nested in it; None when there is none."""
    found = [None]

    def walk(obj, exact):
        if not isinstance(obj, dict) or found[0] is not None:
            return
        for k, v in obj.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and (
                    k in names if exact else re.search(pattern, k)):
                found[0] = v
                return
        for v in obj.values():
            walk(v, exact)

    walk(report, True)
    if found[0] is None:
        walk(report, False)
    return found[0]


def serve_points(data, names, pattern):
    """[(max_batch, value)] from serve's reports, for the batches that report the value."""
    points = []
    for r in data.get("serve", []):
        value = find_number(r["report"], names, pattern)
        if value is not None:
            points.append((r["max_batch"], value))
    return sorted(points)


def plot_serve(data, out_dir):
    if not data.get("serve"):
        return
    tps = serve_points(data, ("tokens_per_second", "tokens_per_s", "tok_per_s",
                              "decode_tokens_per_second", "throughput_tokens_per_second"),
                       r"tok(en)?s?_per_s")
    if tps:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        ax.plot([b for b, _ in tps], [v for _, v in tps], "o-")
        ax.set_xscale("log", base=2)
        ax.set_xticks([b for b, _ in tps], [str(b) for b, _ in tps])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("--max-batch (sequences decoded together)")
        ax.set_ylabel("generated tokens per second")
        ax.set_title("serve: 16 requests on a paged cache")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir + "/serve_throughput.png", dpi=120)
    else:
        print("plot.py: serve's reports give no tokens per second; serve_throughput.png skipped",
              file=sys.stderr)
    paged = dict(serve_points(data, ("peak_kv_bytes",), r"^peak_kv_bytes$"))
    contiguous = dict(serve_points(data, ("contiguous_kv_bytes",), r"^contiguous_kv_bytes$"))
    batches = sorted(set(paged) & set(contiguous))
    if batches:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        x = range(len(batches))
        ax.bar([i - 0.2 for i in x], [contiguous[b] / 2**20 for b in batches], 0.4,
               label="a contiguous cache per request (contiguous_kv_bytes)")
        ax.bar([i + 0.2 for i in x], [paged[b] / 2**20 for b in batches], 0.4,
               label="paged, prefixes shared (peak_kv_bytes)")
        ax.set_xticks(list(x), [str(b) for b in batches])
        ax.set_xlabel("--max-batch (sequences decoded together)")
        ax.set_ylabel("KV cache (MiB)")
        ax.set_title("serve: KV memory of 16 requests, with and without prefix sharing")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir + "/serve_memory.png", dpi=120)
    else:
        print("plot.py: serve's reports give no peak_kv_bytes and contiguous_kv_bytes; "
              "serve_memory.png skipped", file=sys.stderr)


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
            if "of_read" in b:
                thr += " (%.0f%% of read)" % (100 * b["of_read"])
            if "x_contiguous" in b:
                thr += " (%.2fx contiguous)" % b["x_contiguous"]
        elif "per_token" in b:
            thr = "%.3g ns/token" % (b["per_token"] * 1e9)
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


def paged_summary(context, runs):
    for ctx in (8192, 32768):
        cells = []
        for variant in ("p16", "p64", "p16_shuffled", "p64_shuffled"):
            b = runs.get("paged_vs_contiguous/f32/%s/%d/real_time" % (variant, ctx))
            if b:
                cells.append("%s %.2fx" % (variant, b["x_contiguous"]))
        if cells:
            print("paged/contiguous decode, batch 1, %d tokens: %s" % (ctx, ", ".join(cells)))
    read = read_bandwidth(context, runs, "paged_decode/")
    for batch in (1, 4, 16, 64):
        s = series(runs, "paged_decode/f32/b%d" % batch)
        if s and read:
            print("paged_decode/f32/b%d: %s GB/s by context (read bandwidth %.1f GB/s)" % (
                batch, ", ".join("%d: %.1f" % (c, b["bytes_per_second"] / 1e9) for c, b in s.items()),
                read))
    for name in ("prefix/chain_hash/4096", "prefix/match_prefix/4096", "prefix/create_hit/4096"):
        b = runs.get(name)
        if b:
            print("%s: %.2f ns/token" % (name, b["per_token"] * 1e9))
    for name, what in (("paged_pool/allocate_release", "page allocate + release"),
                       ("paged_append/f32/within_page", "append within a page (+ crop)"),
                       ("paged_append/f32/new_page", "append into a new page (+ crop)"),
                       ("paged_fork/4096/manual_time", "fork of 4096 tokens")):
        b = runs.get(name)
        if b:
            print("%s: %.3g ns" % (what, seconds(b) * 1e9))


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    data, runs = load(sys.argv[1])
    context = data["context"]
    out_dir = sys.argv[2]
    plot_latency(runs, out_dir)
    plot_append(runs, out_dir)
    plot_attention(context, runs, out_dir)
    plot_batch_decode(context, runs, out_dir)
    plot_serve(data, out_dir)
    table(context, runs)
    print()
    print("decode_step uncached/cached at 2048: %.0fx" % ratio(runs, "decode_step/uncached/2048", "decode_step/cached/2048"))
    print("append 16384/256: %.2fx; concat 16384/256: %.1fx" % (
        ratio(runs, "append/16384", "append/256"), ratio(runs, "concat/16384", "concat/256")))
    for ctx in (32768, 131072):
        f32 = runs.get("decode_attention/f32/%d/real_time" % ctx)
        for dtype in ("f32", "f16", "bf16", "int8", "int4"):
            b = runs.get("decode_attention/%s/%d/real_time" % (dtype, ctx))
            if b and "of_read" in b:
                print("decode_attention/%s/%d: %.3g ms, %.2f GB/s = %.0f%% of the read bandwidth beside it (%.2f GB/s)%s" % (
                    dtype, ctx, seconds(b) * 1e3, b["bytes_per_second"] / 1e9, 100 * b["of_read"], b["read_GBps"],
                    "; %.2fx faster than f32" % (seconds(f32) / seconds(b)) if f32 and dtype != "f32" else ""))
    for ctx in (512, 1024, 2048, 4096):
        b = runs.get("prefill_attention/%d/real_time" % ctx)
        if b and "of_fma" in b:
            print("prefill_attention/%d: %.0f GFLOP/s (causal half) = %.0f%% of the FMA peak beside it (%.0f GFLOP/s)" % (
                ctx, b["GFLOPs"], 100 * b["of_fma"], b["peak_GFLOPs"]))
    for name, b in runs.items():
        if name.startswith("decoder_step/") and "of_read" in b:
            print("%s: %.1f tokens/s, %.0f%% of read" % (name.replace("/real_time", ""), b["tokens_per_s"], 100 * b["of_read"]))
    paged_summary(context, runs)


if __name__ == "__main__":
    main()
