"""One BERT-base training step on an IMDB-like batch, variant by variant: where the encoder's step time goes (CUDA).

    python benchmarks/encoder_step.py eager nomask bf16 blocks whole     # +p: kernel table; +g: step as a CUDA graph
    W=512 python benchmarks/encoder_step.py eager                         # another batch width

A randomly initialised BERT-base (12 layers, hidden 768, FFN 3072), batch 32 x W tokens (default 320) whose real
lengths are W-63..W (a length-grouped batch, padding mask), SDPA attention, cross-entropy on 2 labels, gradient
clipping 1.0 and fused AdamW, as lmtune's step does. Variants: `eager` (fp32 weights, bf16 autocast), `nomask`
(every row full: no padding mask), `bf16` (bf16 weights, no autocast: a speed reference, not a training recipe),
`master` (bf16 weights, no autocast, fused AdamW on fp32 master copies: a mixed-precision recipe; `master-whole`
compiled as `whole`), `nocudnn` (cuDNN attention off), `blocks` (each layer compiled with dynamic shapes, as
train.compile does),
`blocks-static`, `whole` (the whole model compiled for this one shape), `lnbf16` (eager, but the layer norms take
and give bf16 under autocast: no fp32 residual stream, no casts before the products). Prints wall ms per step over
20 steps after 3 warm-up steps (host-bound where above the GPU time), the GPU's kernel time per step from the
profiler, and MFU (6 x matrix-multiplied parameters x real tokens over 989 TFLOP/s).
"""

from __future__ import annotations

import os
import sys
import time

import torch
import transformers

from lmtune.training import compiling

GEOMETRY = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                vocab_size=30522, num_labels=2)
BATCH, PEAK = 32, 989e12


def build(name: str) -> tuple[torch.nn.Module, torch.optim.Optimizer, int]:
    torch.manual_seed(0)
    config = transformers.BertConfig(**GEOMETRY)
    config._attn_implementation = "sdpa"
    model = transformers.BertForSequenceClassification(config).cuda().train()
    torch.backends.cuda.enable_cudnn_sdp("nocudnn" not in name)
    if name.startswith(("bf16", "master")):
        model = model.to(torch.bfloat16)
    if "lnbf16" in name:
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.forward = _bf16_layer_norm(module)
    if name.startswith("blocks"):
        for module in compiling.blocks(model):
            if name == "blocks-static":
                module.compile(dynamic=False)
    if "whole" in name:
        model.compile(dynamic=False)
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embeddings" not in n)
    if name.startswith("master"):
        return model, MasterAdamW(model.parameters(), lr=2e-5), matmul
    return model, torch.optim.AdamW(model.parameters(), lr=2e-5, fused=True, capturable=True), matmul


class MasterAdamW:
    """Fused AdamW on fp32 master copies of bf16 weights: gradients copied up, weights copied back down."""

    def __init__(self, params, lr: float) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.master = [p.detach().float() for p in self.params]
        for master in self.master:
            master.grad = torch.zeros_like(master)
        self.inner = torch.optim.AdamW(self.master, lr=lr, fused=True, capturable=True)

    def step(self) -> None:
        torch._foreach_copy_([m.grad for m in self.master], [p.grad for p in self.params])
        self.inner.step()
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.master)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


def _bf16_layer_norm(module: torch.nn.LayerNorm):
    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", enabled=False):
            return torch.nn.functional.layer_norm(x.to(torch.bfloat16), module.normalized_shape,
                                                  module.weight.to(torch.bfloat16), module.bias.to(torch.bfloat16),
                                                  module.eps)
    return forward


def batch(width: int, padded: bool) -> tuple[dict[str, torch.Tensor], int]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 30000, (BATCH, width), generator=g)
    lengths = torch.randint(width - 63, width + 1, (BATCH,), generator=g) if padded else torch.full((BATCH,), width)
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    inputs = dict(input_ids=ids * mask, attention_mask=mask, labels=torch.randint(0, 2, (BATCH,), generator=g))
    return {k: v.cuda() for k, v in inputs.items()}, int(lengths.sum())


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, inputs: dict, autocast: bool,
         cache: bool = True) -> None:
    with torch.autocast("cuda", torch.bfloat16, enabled=autocast, cache_enabled=cache):
        loss = model(**inputs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def graphed(model: torch.nn.Module, optimizer, inputs: dict, autocast: bool) -> float:
    """Wall seconds per step with the whole step recorded as one CUDA graph and replayed, as lmtune's loop does."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step(model, optimizer, inputs, autocast, cache=False)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(model, optimizer, inputs, autocast, cache=False)
    graph.replay()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(20):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / 20


def main() -> None:
    from torch.profiler import ProfilerActivity, profile

    width = int(os.environ.get("W", 320))
    for spec in sys.argv[1:] or ["eager"]:
        name, _, flags = spec.partition("+")
        model, optimizer, matmul = build(name)
        inputs, real = batch(width, padded=name != "nomask")
        autocast = not name.startswith(("bf16", "master"))
        started = time.perf_counter()
        for _ in range(3):
            step(model, optimizer, inputs, autocast)
        torch.cuda.synchronize()
        warm = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(20):
            step(model, optimizer, inputs, autocast)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - started) / 20
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step(model, optimizer, inputs, autocast)
            torch.cuda.synchronize()
        gpu = sum(e.self_device_time_total for e in prof.key_averages()) / 5 / 1e6
        flops = 6 * matmul * real
        print(f"{spec:14s} W={width} real tokens {real}  warm-up {warm:5.1f} s  wall {wall * 1e3:6.2f} ms/step  "
              f"GPU {gpu * 1e3:6.2f} ms/step  MFU {flops / wall / PEAK:.1%} (wall) {flops / gpu / PEAK:.1%} (GPU)  "
              f"peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MB", flush=True)
        if "g" in flags:
            replayed = graphed(model, optimizer, inputs, autocast)
            print(f"{spec:14s} recorded as a CUDA graph: {replayed * 1e3:6.2f} ms/step  "
                  f"MFU {flops / replayed / PEAK:.1%}  peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MB",
                  flush=True)
        if "p" in flags:
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70))
        del model, optimizer
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main()
