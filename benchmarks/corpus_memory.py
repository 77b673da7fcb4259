"""Corpora larger than memory (issue 29): does a causal-LM run's memory grow with its corpus?

For each size, writes a corpus of that many bytes (lines of the source files, shuffled, written again and again) to
a temporary folder, then runs `lmtune train` (causal_lm, a fresh lmtune cache so the corpus is tokenized) for a few
hundred steps and samples the anonymous resident memory (RssAnon: heap, not memory-mapped files) of the training
process and all its children every 0.1 s. Prints, per size: peak RssAnon (sum over the process tree and the main
process alone), tokenization time and tokens/s (tokens counted from the packed rows the store holds), and the
whole run's wall time. The corpora are deleted afterwards; nothing here is committed.

    python benchmarks/corpus_memory.py --model <decoder folder> --sources wiki.train.tokens imdb.txt \
        --sizes 0.3,3 --steps 300 --work /tmp/corpus
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def source_lines(paths: list[str]) -> list[str]:
    lines: list[str] = []
    for path in paths:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                if path.endswith((".jsonl", ".jsonl.gz")):
                    line = json.loads(line).get("text", "")
                line = " ".join(line.split())
                if len(line) > 20:
                    lines.append(line)
    return lines


def write_corpus(target: Path, lines: list[str], size: int, seed: int) -> int:
    rng = random.Random(seed)
    written = 0
    with target.open("w", encoding="utf-8") as f:
        while written < size:
            rng.shuffle(lines)
            for line in lines:
                f.write(line + "\n")
                written += len(line.encode("utf-8")) + 1
                if written >= size:
                    break
    return written


def rss_anon_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def phase_at(seconds: float, phases: dict[str, float]) -> str | None:
    """The phase of lmtune's phase_seconds (consecutive laps from the process's start) that `seconds` falls in."""
    end = 0.0
    for name, length in phases.items():
        end += length
        if name != "total" and seconds <= end:
            return name
    return None


def run_and_watch(command: list[str], env: dict[str, str], log: Path) -> tuple[int, int, float, int, float]:
    """(peak RssAnon of the tree in KB, of the main process, wall seconds, exit code, seconds to the peak)."""
    import psutil

    started = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        main = psutil.Process(proc.pid)
        peak_tree = peak_main = 0
        peak_at = 0.0
        while proc.poll() is None:
            try:
                pids = [proc.pid] + [c.pid for c in main.children(recursive=True)]
            except psutil.Error:
                pids = [proc.pid]
            own = rss_anon_kb(proc.pid)
            peak_main = max(peak_main, own)
            tree = own + sum(rss_anon_kb(p) for p in pids[1:])
            if tree > peak_tree:
                peak_tree, peak_at = tree, time.perf_counter() - started
            time.sleep(0.1)
    return peak_tree, peak_main, time.perf_counter() - started, proc.returncode, peak_at


def stored_tokens(cache: Path) -> int:
    import datasets
    from datasets.table import MemoryMappedTable

    total = 0
    for file in (cache / "store").glob("packed-*.arrow"):
        total += sum(datasets.Dataset(MemoryMappedTable.from_file(str(file)))["length"][:])
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a decoder folder (e.g. smollm2-135m converted)")
    parser.add_argument("--sources", nargs="+", required=True, help=".txt / .tokens / .jsonl(.gz) files of text")
    parser.add_argument("--sizes", default="0.3,3", help="corpus sizes in GB, comma-separated")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--validation-docs", type=int, default=1000, help="documents split off to validate on")
    parser.add_argument("--work", default="/tmp/lmtune-corpus", help="a fresh folder per size is made (and removed) in it")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    lines = source_lines(args.sources)
    results = []
    for size in [float(s) for s in args.sizes.split(",")]:
        folder = Path(tempfile.mkdtemp(prefix=f"{size:g}GB-", dir=work))  # its own: nothing there is deleted
        corpus = folder / "corpus.txt"
        made = time.perf_counter()
        written = write_corpus(corpus, list(lines), int(size * 1e9), seed=0)
        made = time.perf_counter() - made
        env = {**os.environ, "LMTUNE_CACHE": str(folder / "cache"), "HF_DATASETS_CACHE": str(folder / "hf")}
        config = {"model": {"name": args.model, "max_length": args.max_length},
                  "data": {"train": str(corpus), "validation_size": args.validation_docs, "test_size": 0},
                  "task": {"name": "causal_lm"}, "method": {"name": "full"},
                  "train": {"batch_size": args.batch_size, "max_steps": args.steps, "checkpoint": False},
                  "eval": {"test": False}, "output": {"dir": str(folder / "runs"), "name": "run"}}
        (folder / "run.json").write_text(json.dumps(config))  # YAML reads JSON
        command = [sys.executable, "-m", "lmtune.cli", "train", str(folder / "run.json")]
        peak_tree, peak_main, wall, code, peak_at = run_and_watch(command, env, folder / "train.log")
        metrics = json.loads((folder / "runs" / "run" / "metrics.json").read_text()) if code == 0 else {}
        phases = metrics.get("phase_seconds", {})
        tokens = stored_tokens(folder / "cache") if code == 0 else 0
        seconds = phases.get("tokenization") or float("nan")
        row = {"size_gb": round(written / 1e9, 3), "exit": code, "peak_rss_anon_tree_mb": round(peak_tree / 1024),
               "peak_rss_anon_main_mb": round(peak_main / 1024), "peak_in_phase": phase_at(peak_at, phases),
               "tokens": tokens,
               "tokenization_s": seconds, "tokens_per_s": round(tokens / seconds) if tokens else None,
               "data_read_s": phases.get("data read and checks"), "wall_s": round(wall, 1),
               "corpus_written_s": round(made, 1), "cpus": os.cpu_count()}
        print(json.dumps(row), flush=True)
        results.append(row)
        shutil.rmtree(folder, ignore_errors=True)
    if len(results) > 1 and all(r["exit"] == 0 for r in results):
        ratio = results[-1]["peak_rss_anon_tree_mb"] / max(1, results[0]["peak_rss_anon_tree_mb"])
        print(f"peak anonymous memory, largest corpus / smallest: {ratio:.2f}x (goal: within 1.2x)")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
