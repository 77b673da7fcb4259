"""The causal-LM loss alone: the model's own (full logits) vs lmtune's chunked loss, time and peak memory (CUDA).

    python benchmarks/lm_loss_micro.py            # Qwen2.5-0.5B's output layer: 8,192 tokens x 896, 151,936 words
    python benchmarks/lm_loss_micro.py --tokens 4096 --hidden 4096 --vocab 128256 --liger   # Llama-3-8B's, + liger

Forward + backward under bf16 autocast with fp32 weights, 10 timed repetitions after 2 warm-ups, for the plain
loss (linear, float copy, cross-entropy) and for `lmtune.tasks.lm_loss.chunked_cross_entropy` at several chunk
sizes; prints milliseconds, peak memory above the inputs, and the loss (the same for all). `--liger` adds
liger-kernel's fused linear cross-entropy (a well-kept library's version of the same idea, given bf16 copies of
the hidden states and weights as autocast would), where the package is installed.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from lmtune.tasks.lm_loss import chunked_cross_entropy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--chunks", type=int, nargs="*", default=[2048, 4096, 8192])
    parser.add_argument("--liger", action="store_true", help="also liger-kernel's fused linear cross-entropy")
    args = parser.parse_args()
    torch.manual_seed(0)
    h = torch.randn(args.tokens, args.hidden, device="cuda", requires_grad=True)
    w = (torch.randn(args.vocab, args.hidden, device="cuda") * 0.02).requires_grad_()
    t = torch.randint(0, args.vocab, (args.tokens,), device="cuda")

    def plain() -> torch.Tensor:
        with torch.autocast("cuda", torch.bfloat16):
            logits = F.linear(h, w)
        return F.cross_entropy(logits.float(), t)

    def chunked(size: int) -> torch.Tensor:
        with torch.autocast("cuda", torch.bfloat16):
            return chunked_cross_entropy(h, w, None, t, size)

    runs = [("plain", plain)] + [(f"chunk {c}", lambda c=c: chunked(c)) for c in args.chunks]
    if args.liger:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        fused = LigerFusedLinearCrossEntropyLoss()
        runs.append(("liger fused", lambda: fused(w.to(torch.bfloat16), h.to(torch.bfloat16), t)))
    for name, fn in runs:
        for _ in range(2):
            fn().backward()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        started = time.perf_counter()
        for _ in range(10):
            h.grad = w.grad = None
            loss = fn()
            loss.backward()
        torch.cuda.synchronize()
        print(f"{name}: {(time.perf_counter() - started) / 10 * 1e3:.1f} ms, "
              f"peak +{(torch.cuda.max_memory_allocated() - base) / 2**20:.0f} MB, loss {loss.item():.5f}", flush=True)


if __name__ == "__main__":
    main()
