"""Decoder tuning throughput and memory of a real geometry on packed 1024-token rows: lmtune vs the Trainer script.

    python benchmarks/decoder_throughput.py --tokenizer /path/to/a/decoder --geometry qwen2.5-0.5b --out dec.json
    # smoke test on a CPU: --geometry tiny --tokens 20000 --max-steps 2

Builds a randomly initialised model of the chosen geometry (Qwen2.5-0.5B: 24 layers, hidden 896, 14 query / 2
key-value heads, FFN 4864, a 151,936-token vocabulary, tied embeddings; issue 7 says synthetic weights are fine for
throughput) with the given tokenizer, and synthetic documents (word counts drawn log-normally around --median words,
each word about one token), about --tokens tokens in all. Then, each in its own process, on the same documents,
batch size, learning rate (2e-5, linear decay, no warmup, no weight decay) and one epoch:
- `hf_trainer`: benchmarks/clm_trainer_baseline.py (run_clm.py: documents concatenated into 1024-token blocks);
- every `--variant NAME=OVERRIDES` (default `full` and `lora`, both with
  `train.compile=true`): lmtune's causal_lm task (documents packed into
  1024-token rows, no attention across documents, memory-lean chunked loss), with those comma-separated overrides.
Prints real tokens/s (whole training time: compilation and graph recording included; "settled": the median rate
between logs after the first quarter of the log, so one-off stalls do not count), MFU (6 x matrix-multiplied parameters per token: weights only), peak GPU memory and the last
logged training loss (parity: the same data and schedule give about the same curve; lmtune does not predict a
document's first token from the previous document), and the ratios to the Trainer and to lmtune's `full`.

The largest decoder per method on one GPU (issue 29): larger geometries (`qwen2.5-1.5b`, `qwen2.5-3b`, `llama-3-8b`:
32 layers, hidden 4096, 32 query / 8 key-value heads, FFN 14336, a 128,256-token vocabulary, untied) are built in
bf16 on the GPU with `--weights-dtype bfloat16`, and `--allow-oom` records a variant that runs out of GPU memory as
"does not fit" instead of stopping:

    python benchmarks/decoder_throughput.py --tokenizer <smollm2-135m> --geometry llama-3-8b --block-size 2048 \
        --batch-size 4 --tokens 300000 --no-baseline --allow-oom --weights-dtype bfloat16 \
        --variant full=method.name=full,train.gradient_checkpointing=true \
        --variant lora=method.name=lora,train.gradient_checkpointing=true \
        --variant qlora=method.name=lora,method.quantize=4bit,train.gradient_checkpointing=true
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from side_by_side import device, run, run_logged  # benchmarks/ is on the path: scripts run from there

GEOMETRIES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                         rms_norm_eps=1e-6, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                         rms_norm_eps=1e-6, tie_word_embeddings=True),
    "qwen2.5-3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                       rms_norm_eps=1e-6, tie_word_embeddings=True),
    "llama-3-8b": dict(architecture="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=151936, max_position_embeddings=2048, tie_word_embeddings=True),
}


def write_documents(path: Path, words: list[str], tokens: int, median: int, rng: np.random.Generator) -> int:
    """Synthetic documents, one per line, until about `tokens` words; returns the number of documents."""
    vocabulary = np.asarray(words)
    written = count = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < tokens:
            n = int(np.clip(rng.lognormal(np.log(median), 0.7), 16, 4 * median))
            f.write(" ".join(vocabulary[rng.integers(0, len(vocabulary), n)]) + "\n")
            written, count = written + n, count + 1
    return count


def logged(run_dir: Path, tokens_per_step: float) -> tuple[float | None, float | None]:
    """The last logged training loss, and the median tokens/s between logs after the log's first quarter
    (compilation, recording, the first steps and one-off stalls left out: the rate a long run settles at)."""
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    records = [r for r in map(json.loads, lines) if "train/loss" in r]
    if len(records) < 4:
        return (records[-1]["train/loss"] if records else None), None
    marks = records[len(records) // 4:]
    rates = [(b["step"] - a["step"]) / (b["time"] - a["time"]) for a, b in zip(marks, marks[1:]) if b["time"] > a["time"]]
    return records[-1]["train/loss"], round(statistics.median(rates) * tokens_per_step, 1) if rates else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="a local decoder folder to take the tokenizer from")
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="qwen2.5-0.5b")
    parser.add_argument("--tokens", type=int, default=2_000_000, help="about this many training tokens")
    parser.add_argument("--median", type=int, default=300, help="median words per document")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--variant", action="append", default=None,
                        help="NAME=comma,separated,overrides (default: full and lora, compiled)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--max-steps", type=int, default=None, help="smoke tests only")
    parser.add_argument("--no-baseline", action="store_true", help="lmtune's variants only (no Trainer run)")
    parser.add_argument("--allow-oom", action="store_true",
                        help="a variant that runs out of GPU memory is reported as not fitting instead of stopping")
    parser.add_argument("--weights-dtype", choices=["float32", "bfloat16"], default="float32",
                        help="the random weights' dtype on disk (bfloat16 halves an 8B folder to 16 GB)")
    parser.add_argument("--work-dir", default="runs/decoder-throughput")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    torch.manual_seed(0)
    geometry = dict(GEOMETRIES[args.geometry])
    config_class, model_class = ((LlamaConfig, LlamaForCausalLM) if geometry.pop("architecture", "qwen2") == "llama"
                                 else (Qwen2Config, Qwen2ForCausalLM))
    dtype = getattr(torch, args.weights_dtype)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built straight in the dtype saved, on the GPU where there is one (fast init)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = model_class(config_class(**geometry, bos_token_id=tokenizer.bos_token_id,
                                         eos_token_id=tokenizer.eos_token_id))
    torch.set_default_dtype(default_dtype)
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    if model.config.tie_word_embeddings:  # the output layer multiplies by the embedding table
        matmul_params += model.get_output_embeddings().weight.numel()
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    del model
    if torch.cuda.is_available():  # give the GPU back to the runs (this process would keep the 16 GB of an 8B cached)
        torch.cuda.empty_cache()
    words = [w for w in tokenizer.get_vocab() if w.startswith("Ġ") and w[1:].isalpha() and w[1:].islower()]
    words = [w[1:] for w in words if len(tokenizer(" " + w[1:], add_special_tokens=False)["input_ids"]) == 1]
    docs = write_documents(work / "docs.txt", words, args.tokens, args.median, np.random.default_rng(0))
    print(f"{docs} synthetic documents, about {args.tokens} tokens; geometry {args.geometry}, "
          f"{matmul_params / 1e6:.0f}M matrix-multiplied parameters", flush=True)

    rows: dict[str, dict] = {}
    baseline = [sys.executable, "benchmarks/clm_trainer_baseline.py", "--model", str(work / "model"), "--train",
                str(work / "docs.txt"), "--block-size", str(args.block_size), "--batch-size", str(args.batch_size),
                "--out", str(work / "hf_trainer.json")]
    if args.max_steps:
        baseline += ["--max-steps", str(args.max_steps)]
    if not args.no_baseline:
        wall = run(baseline)
        theirs = json.loads((work / "hf_trainer.json").read_text())
        rows["hf_trainer"] = {"train_seconds": theirs["train_seconds"], "real_tokens_per_second":
                              theirs["real_tokens_per_second"], "peak_memory_mb": theirs["peak_memory_mb"],
                              "settled_tokens_per_second": theirs["settled_tokens_per_second"],
                              "loss": theirs["last_logged_loss"], "steps": theirs["steps"], "wall_seconds": wall}
    config = work / "lmtune.yaml"
    config.write_text(json.dumps({
        "model": {"name": str(work / "model"), "max_length": args.block_size},
        "data": {"train": str(work / "docs.txt"), "validation_size": 0, "test_size": 0},
        "task": {"name": "causal_lm"}, "method": {"name": "full"},
        "train": {"epochs": 1, "batch_size": args.batch_size, "lr": 2e-5, "warmup_ratio": 0.0, "weight_decay": 0.0,
                  "schedule": "linear", "checkpoint": False, "load_best": False, "log_every": 10, "seed": 42,
                  **({"max_steps": args.max_steps} if args.max_steps else {})},
        "eval": {"test": False}, "output": {"dir": str(work / "runs"), "overwrite": True}}), encoding="utf-8")
    for spec in args.variant or ["full=method.name=full,train.compile=true", "lora=method.name=lora,train.compile=true"]:
        name, _, overrides = spec.partition("=")
        command = [sys.executable, "-m", "lmtune.cli", "train", str(config), f"output.name={name}",
                   *filter(None, overrides.split(","))]
        wall, why = run_logged(command, work / f"{name}.log") if args.allow_oom else (run(command), None)
        if why:  # the next variants still run: one failure does not lose the others' figures
            rows[name] = {"fits": False, "wall_seconds": wall, "failed": why}
            print(f"{name}: does not fit (CUDA out of memory)" if why == "out of memory" else
                  f"variant {name} failed:\n{why}", flush=True)
            continue
        ours = json.loads((work / "runs" / name / "metrics.json").read_text())
        rows[name] = {"train_seconds": ours["train_seconds"], "real_tokens_per_second": ours["train_tokens_per_second"],
                      "peak_memory_mb": max((s.get("peak_memory_mb") or 0 for s in ours["stages"].values()),
                                            default=0) or None,
                      "steps": ours["steps"], "wall_seconds": wall}
        rows[name]["loss"], rows[name]["settled_tokens_per_second"] = logged(
            work / "runs" / name, ours["train_tokens_per_second"] * ours["train_seconds"] / ours["steps"])
        print(json.dumps({name: rows[name]}), flush=True)  # each row as it lands (a call cut short keeps them)
    fitted = {name: r for name, r in rows.items() if r.get("fits", True)}
    for r in fitted.values():
        r["mfu"] = round(6 * matmul_params * r["real_tokens_per_second"] / (args.peak_tflops * 1e12), 4)
    base, full = fitted.get("hf_trainer", {}), fitted.get("full")  # (a failed variant has no figures)
    for name, r in fitted.items():
        if base:
            r["throughput_vs_trainer"] = round(r["real_tokens_per_second"] / base["real_tokens_per_second"], 2)
        if r.get("settled_tokens_per_second") and base.get("settled_tokens_per_second"):
            r["settled_vs_trainer"] = round(r["settled_tokens_per_second"] / base["settled_tokens_per_second"], 2)
        if base.get("peak_memory_mb") and r["peak_memory_mb"]:
            r["memory_vs_trainer"] = round(r["peak_memory_mb"] / base["peak_memory_mb"], 2)
        if full:
            r["throughput_vs_full"] = round(r["real_tokens_per_second"] / full["real_tokens_per_second"], 2)
            if r.get("settled_tokens_per_second") and full.get("settled_tokens_per_second"):
                r["settled_vs_full"] = round(r["settled_tokens_per_second"] / full["settled_tokens_per_second"], 2)
    result = {"date": time.strftime("%Y-%m-%d"), "device": device(), "geometry": args.geometry,
              "matmul_params": matmul_params, "documents": docs, "rows": rows}
    print("\n| system | train s | real tokens/s (settled) | MFU | peak MB | last loss | steps | x Trainer tokens/s "
          "(settled) | x Trainer memory | x full tokens/s (settled) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in rows.keys() - fitted.keys():
        why = "does not fit (CUDA out of memory)" if rows[name]["failed"] == "out of memory" else "failed"
        print(f"| {name} | {why} | | | | | | | | |")
    for name, r in fitted.items():
        print(f"| {name} | {r['train_seconds']:.1f} | {r['real_tokens_per_second']:.0f} "
              f"({r.get('settled_tokens_per_second') or '-'}) | {r['mfu']:.1%} | "
              f"{r['peak_memory_mb'] or 0:.0f} | {r['loss'] or float('nan'):.3f} | {r['steps']} | "
              f"{r.get('throughput_vs_trainer', '-')} ({r.get('settled_vs_trainer', '-')}) | {r.get('memory_vs_trainer', '-')} | "
              f"{r.get('throughput_vs_full', '-')} ({r.get('settled_vs_full', '-')}) |")
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2), encoding="utf-8")
    if any(r.get("failed", "out of memory") != "out of memory" for r in rows.values()):
        raise SystemExit("a variant failed (above)")


if __name__ == "__main__":
    main()
