#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0
"""What each cache costs a trained model: the quality table and the window probe.

Runs `tiny_decoder --eval-json` over the held-out text of the Brown model for every cache
format and window setting, and prints a Markdown table: bytes per cached position,
perplexity, its change against f32, bits per byte and the mean KL divergence of the
next-token distributions against an f32 cache.

The window probe: texts that repeat a passage at a distance of D tokens. A model can copy the
second copy from the first if its cache still holds it; the loss on the second copy shows what
a sliding window forgets, which the memory table only counts. Plotted to --plot.

  /usr/bin/python3 examples/tiny_decoder/quality.py --decoder build/demo/examples/tiny_decoder
(scripts/quality.sh builds the decoder and runs this.)
"""
import argparse
import concurrent.futures
import csv
import json
import os
import subprocess
import sys

FORMATS = [("f32", {}), ("f16", {}), ("bf16", {})]
for bits in ("int8", "int4"):
    for group in (32, 64, 128):
        for residual in (0, 32, 128):
            FORMATS.append((bits, {"group": group, "residual": residual}))
WINDOWS = [(w, s) for w in (64, 128, 256) for s in (0, 4)]
PROBE_WINDOWS = [(w, s) for w in (64, 128, 256, 384) for s in (0, 4)]
NEWLINE = 3 + ord("\n")  # the byte-fallback token of "\n"


def run(decoder, model, text_file, kv_type="f32", group=None, residual=None, window=0, sinks=0,
        tokens_out=None):
    cmd = [decoder, "--checkpoint", os.path.join(model, "model.bin"),
           "--tokenizer", os.path.join(model, "tokenizer.bin"), "--eval-json", text_file,
           "--kv-type", kv_type]
    if group is not None:
        cmd += ["--group", str(group), "--residual", str(residual)]
    if window:
        cmd += ["--window", str(window), "--sinks", str(sinks)]
    if tokens_out:
        cmd += ["--eval-tokens-out", tokens_out]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"quality.py: {' '.join(cmd)} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def name_of(r):
    name = r["kv_type"]
    if r["kv_type"] in ("int8", "int4"):
        name += f" g{r['group']} r{r['residual']}"
    if r["window"]:
        name += f", window {r['window']}" + (f" + {r['sinks']} sinks" if r["sinks"] else "")
    return name


def table(decoder, model, jobs):
    heldout = os.path.join(model, "heldout.txt")
    configs = [dict(kv_type=f, **extra) for f, extra in FORMATS]
    configs += [dict(kv_type="f32", window=w, sinks=s) for w, s in WINDOWS]
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(lambda c: run(decoder, model, heldout, **c), configs))
    base = results[0]["perplexity"]
    lines = ["| cache | bytes / position | perplexity | change | bits / byte | mean KL vs f32 (nats) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        change = 100.0 * (r["perplexity"] / base - 1.0)
        lines.append(f"| {name_of(r)} | {r['kv_bytes_per_token']:.0f} | {r['perplexity']:.3f} | "
                     f"{change:+.2f}% | {r['bits_per_byte']:.4f} | {r['mean_kl_vs_f32']:.2e} |")
    first = results[0]
    header = (f"Held-out text: {first['text_bytes']} bytes, {first['tokens']} tokens in "
              f"{first['chunks']} chunks of up to {first['chunk']} positions; bytes / position "
              f"is the cache's bytes() after a full chunk of {first['kv_positions']} positions, "
              "divided by them.")
    return header, "\n".join(lines), results


def probe_texts(model, out_dir, distance, passage_chars=260, count=6):
    """Texts `passage + filler + passage`, the copies `distance` tokens apart (roughly: the
    filler's length is estimated at 2.6 characters a token; the measured distance is
    reported). Passages and fillers come from different held-out texts."""
    with open(os.path.join(model, "heldout.txt")) as f:
        docs = [d for d in f.read().split("\n\n") if d.strip()]
    paths = []
    for i in range(count):
        doc = docs[i % len(docs)]
        other = docs[(i + 1) % len(docs)]
        at = (i // len(docs)) * 2000
        passage = doc[at:at + passage_chars].rsplit(" ", 1)[0]
        filler_chars = int((distance - 0.4 * len(passage)) * 2.6)
        filler = other[at:at + filler_chars].rsplit(" ", 1)[0]
        path = os.path.join(out_dir, f"probe_{distance}_{i}.txt")
        with open(path, "w") as f:
            f.write(passage + "\n\n" + filler + "\n\n " + passage)
        paths.append(path)
    return paths


def probe(decoder, model, out_dir, distance, jobs):
    """Mean loss on the second copy (its first token excluded) and on the first, per cache."""
    paths = probe_texts(model, out_dir, distance)
    configs = [dict()] + [dict(window=w, sinks=s) for w, s in PROBE_WINDOWS]

    def one(args):
        path, c = args
        tokens_out = path + f".w{c.get('window', 0)}s{c.get('sinks', 0)}.csv"
        run(decoder, model, path, tokens_out=tokens_out, **c)
        with open(tokens_out) as f:
            rows = list(csv.DictReader(f))
        tokens = [int(r["token"]) for r in rows]
        nll = [float(r["nll"]) for r in rows]
        if any(int(r["position"]) != int(r["index"]) + 1 for r in rows):
            sys.exit(f"quality.py: {path} does not fit one chunk: lower --distance")
        length = tokens.index(NEWLINE)  # the first copy: tokens [0, length)
        second = len(tokens) - length
        if tokens[second:] != tokens[:length]:
            sys.exit(f"quality.py: the copies in {path} tokenize differently")
        return {"window": c.get("window", 0), "sinks": c.get("sinks", 0), "distance": second,
                "first": sum(nll[1:length]) / (length - 1),
                "second": sum(nll[second + 1:]) / (length - 1)}

    work = [(p, c) for p in paths for c in configs]
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        rows = list(pool.map(one, work))
    summary = []
    for c in configs:
        mine = [r for r in rows if r["window"] == c.get("window", 0) and r["sinks"] == c.get("sinks", 0)]
        summary.append({"window": c.get("window", 0), "sinks": c.get("sinks", 0),
                        "first": sum(r["first"] for r in mine) / len(mine),
                        "second": sum(r["second"] for r in mine) / len(mine),
                        "distances": sorted(r["distance"] for r in mine)})
    return summary


def plot(summary, distance, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels, gain, colors = [], [], []
    for s in summary:
        if s["window"] == 0:
            labels.append("full")
            colors.append("#444444")
        else:
            labels.append(f"{s['window']}" + (f"+{s['sinks']}" if s["sinks"] else ""))
            colors.append("#c44e52" if s["window"] < distance else "#4c72b0")
        gain.append(1000.0 * (s["first"] - s["second"]))
    fig, ax = plt.subplots(figsize=(7, 3.4), dpi=110)
    ax.bar(range(len(labels)), gain, color=colors)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel("cache: full, or window (+ sinks), in tokens")
    ax.set_ylabel("first copy loss - second copy loss\n(millinats / token)")
    ax.set_title(f"What the second copy of a passage gains from the first, {distance} tokens "
                 "back:\nwindows shorter than that (red) lose it", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--decoder", required=True, help="the tiny_decoder program")
    p.add_argument("--model", default=os.path.join(os.path.dirname(__file__), "brown"))
    p.add_argument("--work", default="build/quality", help="directory for probe texts")
    p.add_argument("--distance", type=int, default=200, help="probe distance D, in tokens")
    p.add_argument("--plot", help="where to write the probe's plot (PNG)")
    p.add_argument("--json", help="where to write every result")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--probe-only", action="store_true", help="skip the table")
    a = p.parse_args()
    os.makedirs(a.work, exist_ok=True)

    results = []
    if not a.probe_only:
        header, markdown, results = table(a.decoder, a.model, a.jobs)
        print(header + "\n\n" + markdown + "\n")
    summary = probe(a.decoder, a.model, a.work, a.distance, a.jobs)
    print(f"Window probe: a passage repeated at a distance of {a.distance} tokens "
          f"(measured: {summary[0]['distances']}); mean loss in nats per token.\n")
    print("| cache | loss on the first copy | loss on the second copy |\n| --- | ---: | ---: |")
    for s in summary:
        name = "full" if s["window"] == 0 else f"window {s['window']}" + (
            f" + {s['sinks']} sinks" if s["sinks"] else "")
        print(f"| {name} | {s['first']:.3f} | {s['second']:.3f} |")
    if a.plot:
        plot(summary, a.distance, a.plot)
        print(f"\nplot: {a.plot}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"table": results, "probe": summary}, f, indent=1)


if __name__ == "__main__":
    main()
