"""Encoder fine-tuning throughput of a real geometry on IMDB-like lengths: lmtune vs the Trainer script, side by side.

    python benchmarks/encoder_throughput.py --tokenizer /path/to/minilm --geometry bert-base --out enc.json
    # smoke test on a CPU: --geometry tiny --rows 200 --max-steps 3

Builds a randomly initialised model of the chosen geometry (BERT-base: 12 layers, hidden 768, 12 heads, FFN 3072;
issue 7 says synthetic weights are fine for throughput) with the given BERT tokenizer, and synthetic reviews: word
counts drawn log-normally around a median of --median words (IMDB's is about 230 words, about 300 tokens), capped so
rows fit --max-length, made of whole-word vocabulary entries (about one token each), random binary labels. Then runs
benchmarks/sst2_compare.py on them (batch 32, one epoch, max length 512, the Trainer padded to 512 and with dynamic
padding; lmtune without resumable checkpoints, as the Trainer script saves none), which prints real tokens/s, MFU,
peak memory and the speed-ups. Accuracy is meaningless here (random
labels); use sst2_compare.py on real data for parity.
"""

from __future__ import annotations

import argparse
import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GEOMETRIES = {"bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
              "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
              "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)}


def write_reviews(path: Path, words: list[str], rows: int, median: int, cap: int, rng: np.random.Generator) -> int:
    """`rows` synthetic reviews with log-normal word counts; returns their word total."""
    counts = np.clip(rng.lognormal(np.log(median), 0.6, rows).astype(int), 8, cap)
    labels = rng.integers(0, 2, rows)
    vocabulary = np.asarray(words)
    picks = vocabulary[rng.integers(0, len(vocabulary), int(counts.sum()))]
    ends = np.cumsum(counts)
    with gzip.open(path, "wt", encoding="utf-8") if path.suffix == ".gz" else open(path, "w", encoding="utf-8") as f:
        f.write("sentence\tlabel\n")
        for end, n, label in zip(ends, counts, labels):
            f.write(" ".join(picks[end - n:end]) + f"\t{label}\n")
    return int(counts.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="a local BERT-style model folder to take the tokenizer from")
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="bert-base")
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--median", type=int, default=230, help="median words per review")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-steps", type=int, default=None, help="smoke tests only")
    parser.add_argument("--work-dir", default="runs/encoder-throughput")
    parser.add_argument("--set", nargs="*", default=[], help="extra lmtune overrides (e.g. train.compile=true)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    work = Path(args.work_dir).resolve()
    (work / "data").mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    tokenizer.model_max_length = args.max_length
    config = BertConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=512, num_labels=2,
                        **GEOMETRIES[args.geometry])
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and w.islower() and len(w) > 2]
    rng = np.random.default_rng(0)
    cap = args.max_length - 2  # [CLS] and [SEP]
    total = write_reviews(work / "data" / "train.tsv.gz", words, args.rows, args.median, cap, rng)
    write_reviews(work / "data" / "dev.tsv", words, 500, args.median, cap, rng)
    print(f"{args.rows} synthetic reviews, {total / args.rows:.0f} words each on average; geometry {args.geometry}",
          flush=True)
    command = [sys.executable, "benchmarks/sst2_compare.py", "--model", str(work / "model"), "--data-dir",
               str(work / "data"), "--max-length", str(args.max_length), "--epochs", "1", "--dynamic-padding",
               "--work-dir", str(work / "runs"),
               # The Trainer script saves nothing while it trains: neither does lmtune here (throughput only).
               "--set", "train.checkpoint=false", *args.set]
    if args.max_steps:
        command += ["--max-steps", str(args.max_steps)]
    if args.out:
        command += ["--out", args.out]
    subprocess.run(command, check=True, cwd=ROOT)


if __name__ == "__main__":
    main()
