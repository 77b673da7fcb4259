"""An adapter run's frozen linear layers held in bf16: the same numbers under autocast, half the bytes, and a
model that still runs outside autocast."""

from __future__ import annotations

import json
import logging
import math

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

import lmtune
from lmtune.training.frozen import HalfFrozenLinear, hold_frozen_linear


def _lora(folder):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():  # adapters that change the output (peft starts lora_B at zero)
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    return model.eval()


def test_same_logits_under_autocast_and_half_the_frozen_bytes(tiny_decoder_dir) -> None:
    model = _lora(tiny_decoder_dir)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            before = model(input_ids=ids).logits
        frozen_bytes = sum(m.weight.numel() * 4 for m in model.modules() if type(m) is torch.nn.Linear
                           and not m.weight.requires_grad and m.weight is not model.get_input_embeddings().weight)
        freed = hold_frozen_linear(model, torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            after = model(input_ids=ids).logits
        outside = model(input_ids=ids).logits
    assert torch.equal(before, after)
    assert 0 < freed == frozen_bytes // 2
    base = model.base_model.model.model.layers[0].self_attn
    assert isinstance(base.q_proj.base_layer, HalfFrozenLinear) and base.q_proj.base_layer.weight.dtype == torch.bfloat16
    assert base.k_proj.weight.dtype == torch.bfloat16  # frozen, no adapter: held in bf16 too
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)  # the adapters
    assert model.get_input_embeddings().weight.dtype == torch.float32  # embeddings (and the head tied to them)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert outside.dtype == torch.float32 and torch.isfinite(outside).all()
    assert (outside - full).abs().max() < 0.05 * full.abs().max()  # bf16 products, not a different model


def test_layers_that_train_now_or_later_stay_fp32() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model.requires_grad_(False)
    model[0].bias.requires_grad_(True)  # the bias trains (BitFit-like)
    freed = hold_frozen_linear(model, torch.bfloat16, trained={"1.weight"})  # a later stage trains layer 1
    assert [type(m).__name__ for m in model] == ["Linear", "Linear", "HalfFrozenLinear"]
    assert freed == (16 + 4) * 2 and model[1].weight.dtype == torch.float32


def test_dora_base_layers_stay_fp32(tiny_decoder_dir) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir, dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True,
                                                       task_type="CAUSAL_LM"))
    hold_frozen_linear(model, torch.bfloat16)
    attention = model.base_model.model.model.layers[0].self_attn
    assert attention.q_proj.base_layer.weight.dtype == torch.float32  # DoRA normalises it: kept exact
    assert attention.k_proj.weight.dtype == torch.bfloat16


@pytest.fixture
def bf16_process():
    """accelerate keeps one precision a process (a second one is refused): this test's own, then fp32 again."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def test_a_bf16_lora_run_holds_its_backbone_in_bf16_and_learns(tiny_decoder_dir, tmp_path, caplog,
                                                               bf16_process) -> None:
    from helpers import write_jsonl

    rows = [{"text": f"the {w} sat on the mat and the {w} slept"} for w in ["cat", "dog", "bird", "fox"] * 8]
    cfg = {"model": {"name": str(tiny_decoder_dir), "max_length": 32},
           "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", rows)), "validation_size": 4, "test_size": 0},
           "task": {"name": "causal_lm"}, "method": {"name": "lora", "r": 4, "lr": 5e-2},
           "train": {"epochs": 8, "batch_size": 4, "precision": "bf16", "log_every": 2, "checkpoint": False},
           "output": {"dir": str(tmp_path / "runs"), "name": "lora"}}
    with caplog.at_level(logging.INFO, logger="lmtune.run"):
        result = lmtune.train(cfg)
    assert any("frozen linear layers held in bf16" in r.getMessage() for r in caplog.records)
    losses = [json.loads(line)["train/loss"] for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in line]
    assert len(losses) >= 6 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2
    assert math.isfinite(result.metrics["validation"]["loss"])
    assert lmtune.load(result.run_dir).predict(["the cat"])  # the saved adapter on the fp32 backbone
