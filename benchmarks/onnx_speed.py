"""ONNX Runtime on the CPU against PyTorch on the CPU for one classification run: batch-1 latency, batch-32
throughput, and accuracy on a labelled file, for PyTorch fp32, ONNX fp32 and ONNX int8 (exported here).

    python benchmarks/onnx_speed.py RUN --data ../shared/data/sst2/dev.tsv [--threads N] [--repeats 200]

Each runtime predicts through lmtune.load(...).predict, so tokenizing and post-processing count alike. Prints one JSON
line per runtime and a Markdown table with the ratios against PyTorch."""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import time
from pathlib import Path


def model_only(model, texts: list[str], repeats: int) -> dict:
    """The runtime alone: dev sentences tokenized and padded once, then only `model(**batch)` is timed."""
    import torch

    session = model.session
    encoded = session.encode(session.task.from_texts(texts))
    rows = [encoded[i] for i in range(len(encoded))]
    singles = [session.collate([rows[i % len(rows)]]) for i in range(repeats)]
    batches = [session.collate(rows[i:i + 32]) for i in range(0, min(len(rows), 32 * 25), 32)]
    strip = lambda b: {k: v for k, v in b.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    times = []
    with torch.inference_mode():
        for b in singles[:20]:
            session.model(**strip(b))
        for b in singles:
            t = time.perf_counter()
            session.model(**strip(b))
            times.append(time.perf_counter() - t)
        t = time.perf_counter()
        for b in batches:
            session.model(**strip(b))
        seconds = time.perf_counter() - t
    return {"forward1_ms_median": round(1000 * statistics.median(times), 3),
            "forward32_rows_per_second": round(sum(len(b["input_ids"]) for b in batches) / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--data", required=True, help="labelled file in the run's format (its dev/test set)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", default=None, help="where the exports go (default: beside the run)")
    args = parser.parse_args()

    import torch

    import lmtune
    from lmtune.predict import export

    torch.set_num_threads(args.threads)
    run = Path(args.run)
    out = Path(args.out) if args.out else run.parent
    started = time.perf_counter()
    fp32 = export(run, out / f"{run.name}-onnx", format="onnx", overwrite=True)
    export_seconds = time.perf_counter() - started
    int8 = export(run, out / f"{run.name}-onnx-int8", format="onnx", quantize="int8", overwrite=True)
    with open(args.data, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if args.data.endswith(".tsv")
                    else csv.DictReader(f))
    texts = [r.get("sentence") or r["text"] for r in rows]
    results = []
    for name, folder in (("pytorch fp32", run), ("onnx fp32", fp32), ("onnx int8", int8)):
        model = lmtune.load(folder, device="cpu")
        if hasattr(model.session.model, "session"):  # onnxruntime: the same number of threads as torch
            from lmtune.serving.onnx import OUTPUTS, OnnxModel

            model.session.model = OnnxModel(Path(folder) / "model.onnx", model.session.model.config,
                                            OUTPUTS["classification"], threads=args.threads)
        for text in texts[:20]:  # warm-up
            model.predict([text])
        forward = model_only(model, texts, args.repeats)
        single = []
        for i in range(args.repeats):
            t = time.perf_counter()
            model.predict([texts[i % len(texts)]])
            single.append(time.perf_counter() - t)
        batches = [texts[i:i + 32] for i in range(0, min(len(texts), 32 * 25), 32)]
        t = time.perf_counter()
        for batch in batches:
            model.predict(batch)
        throughput = sum(map(len, batches)) / (time.perf_counter() - t)
        accuracy = model.evaluate(args.data)["accuracy"]
        result = {"runtime": name, "threads": args.threads, **forward,
                  "batch1_ms_median": round(1000 * statistics.median(single), 3),
                  "batch32_rows_per_second": round(throughput, 1), "accuracy": round(accuracy, 4)}
        print(json.dumps(result), flush=True)
        results.append(result)
    base = results[0]
    print(f"\nexport (fp32, checked) {export_seconds:.1f} s; {args.threads} threads; {len(texts)} rows in {args.data}")
    print("The model alone (the same tokenized batches into each runtime):")
    print("| runtime | batch-1 forward ms | speed-up | batch-32 forward rows/s | speed-up |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['runtime']} | {r['forward1_ms_median']} | {base['forward1_ms_median'] / r['forward1_ms_median']:.2f}x"
              f" | {r['forward32_rows_per_second']} | "
              f"{r['forward32_rows_per_second'] / base['forward32_rows_per_second']:.2f}x |")
    print("\nEnd to end through lmtune.load(...).predict (tokenizing and post-processing included):")
    print("| runtime | batch-1 latency ms | speed-up | batch-32 rows/s | speed-up | accuracy | change (points) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['runtime']} | {r['batch1_ms_median']} | {base['batch1_ms_median'] / r['batch1_ms_median']:.2f}x | "
              f"{r['batch32_rows_per_second']} | {r['batch32_rows_per_second'] / base['batch32_rows_per_second']:.2f}x "
              f"| {r['accuracy']:.4f} | {100 * (r['accuracy'] - base['accuracy']):+.2f} |")


if __name__ == "__main__":
    main()
