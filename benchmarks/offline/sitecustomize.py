"""Benchmark-only start-up hook (not part of lmtune): LIGER=1 patches transformers' Qwen2/Llama modules with
liger-kernel's RoPE, RMSNorm and SwiGLU kernels (the loss stays lmtune's chunked one) before any model is built."""
import os

if os.environ.get("LIGER") == "1":
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama, apply_liger_kernel_to_qwen2

        kw = dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)
        apply_liger_kernel_to_qwen2(**kw)
        apply_liger_kernel_to_llama(**kw)
        print("[liger] rope, rms_norm, swiglu patched (qwen2, llama)", flush=True)
    except Exception as err:  # noqa: BLE001 - a benchmark hook: say why and go on unpatched
        print(f"[liger] not applied: {err!r}", flush=True)

if os.environ.get("CAP_GPU_GB"):  # cap a process at an 80 GB card's memory on a larger one (H200)
    try:
        import torch

        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, float(os.environ["CAP_GPU_GB"]) * 2**30 / total))
    except Exception as err:  # noqa: BLE001
        print(f"[cap] not applied: {err!r}", flush=True)
