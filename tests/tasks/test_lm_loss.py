"""The memory-lean causal-LM loss equals the model's own, in value and gradients; gradient checkpointing too."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import lmtune
from lmtune.tasks import lm_loss
from test_causal_lm import lm_config, load, other_geometry


@pytest.mark.parametrize("bias", [False, True])
def test_chunked_cross_entropy_matches_plain_values_and_gradients(bias: bool) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    b = torch.randn(11, requires_grad=True) if bias else None
    targets = torch.randint(0, 11, (2, 5))
    targets[0, :2] = -100
    plain = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight, b).flatten(0, 1),
                                              targets.flatten(), ignore_index=-100)
    (plain * 3).backward()
    want = [t.grad.clone() for t in (hidden, weight, b) if t is not None]
    for t in (hidden, weight, b):
        if t is not None:
            t.grad = None
    chunked = lm_loss.chunked_cross_entropy(hidden, weight, b, targets, chunk=3)  # 10 rows: chunks of 3, 3, 3, 1
    (chunked * 3).backward()
    assert torch.allclose(chunked, plain, atol=1e-6)
    for got, expected in zip([t.grad for t in (hidden, weight, b) if t is not None], want):
        assert torch.allclose(got, expected, atol=1e-6)
    # Over a given count (several micro-batches' targets): the sum of token losses divided by it.
    summed = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight, b).flatten(0, 1),
                                               targets.flatten(), ignore_index=-100, reduction="sum")
    over = lm_loss.chunked_cross_entropy(hidden, weight, b, targets, chunk=4, count=torch.tensor(20))
    assert torch.allclose(over, summed / 20, atol=1e-6)


@pytest.mark.parametrize("geometry", ["llama", "gpt2", "qwen2"])
def test_installed_loss_trains_like_the_models_own(geometry: str, tiny_decoder_dir: Path) -> None:
    tokenizer, model = load(tiny_decoder_dir)
    if geometry != "llama":
        model = other_geometry(geometry, len(tokenizer))
    model.config.tie_word_embeddings = geometry != "qwen2"  # tied (Llama, GPT-2) and untied output weights
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    own = copy.deepcopy(model)
    undo = lm_loss.install(model, chunk=5)
    assert callable(undo), undo
    ids = torch.randint(0, len(tokenizer), (3, 9), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :4] = -100
    model.train()  # training: the output layer hands the hidden states to the chunked loss
    assert model(input_ids=ids).logits.shape[-1] == model.config.hidden_size != model.config.vocab_size
    for m in (model, own):
        m.train()
        m(input_ids=ids, labels=labels).loss.backward()
    assert torch.allclose(model(input_ids=ids, labels=labels).loss, own(input_ids=ids, labels=labels).loss, atol=1e-5)
    grads = dict(own.named_parameters())
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, grads[name].grad, atol=1e-5), name
    model.eval()  # evaluation and generation see real logits
    assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size
    undo()
    model.train()
    assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size


def test_install_keeps_the_own_loss_of_a_model_that_changes_its_logits() -> None:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                           final_logit_softcapping=0.5))
    problem = lm_loss.install(model, chunk=4)
    assert problem and "changes the logits" in problem
    model.train()
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1] == 50  # uninstalled


def test_no_grad_and_compiled_chunks_match_the_plain_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 8, requires_grad=True)
    weight = torch.randn(13, 8, requires_grad=True)
    targets = torch.randint(0, 13, (3, 7))
    targets[1, :3] = -100
    plain = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight).flatten(0, 1),
                                              targets.flatten(), ignore_index=-100)
    with torch.no_grad():  # no gradient buffers, same value
        assert torch.allclose(lm_loss.chunked_cross_entropy(hidden, weight, None, targets, chunk=4), plain, atol=1e-6)
    plain.backward()
    want = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    if __import__("shutil").which("cc") is None:
        pytest.skip("torch.compile on the CPU needs a C compiler")
    # The compiled chunk function CUDA runs (in-place gradient accumulation inside compiled code), here on the CPU.
    compiled = torch.compile(lm_loss._chunk, dynamic=True)
    monkeypatch.setattr(lm_loss, "_chunk_function", lambda device: compiled)
    lm_loss.chunked_cross_entropy(hidden, weight, None, targets, chunk=4).backward()  # chunks of 4 and 1 rows
    assert torch.allclose(hidden.grad, want[0], atol=1e-5) and torch.allclose(weight.grad, want[1], atol=1e-5)


def test_fp16_output_weights_keep_the_models_own_loss(tiny_decoder_dir: Path) -> None:
    _, model = load(tiny_decoder_dir)
    problem = lm_loss.install(model.half(), chunk=4)
    assert isinstance(problem, str) and "fp16" in problem


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["train/loss"] for r in map(json.loads, lines) if "train/loss" in r]


def test_chunked_loss_and_gradient_checkpointing_train_as_the_plain_run(tiny_decoder_dir: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    chunked = lm_loss.chunked_cross_entropy
    monkeypatch.setattr(lm_loss, "chunked_cross_entropy", lambda *a, **k: calls.append(a[-2]) or chunked(*a, **k))
    runs = {}
    for name, task, train in (("plain", {"loss_chunk": None}, {}), ("chunked", {"loss_chunk": 5}, {}),
                              ("checkpointed", {"loss_chunk": None}, {"gradient_checkpointing": True}),
                              ("lora_plain", {"loss_chunk": None}, {"lr": 1e-2}), ("lora", {"loss_chunk": 5}, {"lr": 1e-2})):
        cfg = lm_config(tiny_decoder_dir, tmp_path)
        cfg["task"].update(task)
        cfg["train"].update(epochs=1, **train)
        cfg["eval"] = {}
        cfg["output"]["name"] = name
        if name.startswith("lora"):
            cfg["method"] = {"name": "lora", "dropout": 0.0}
        calls.clear()
        runs[name] = lmtune.train(cfg)
        saved = runs[name].run_dir / "model" / "config.json"  # (adapter runs save the adapter only)
        assert not saved.exists() or json.loads(saved.read_text()).get("use_cache", True) is True  # off in training
        assert bool(calls) == (name in ("chunked", "lora")) and set(calls) <= {5}, name
    plain = losses(runs["plain"].run_dir)
    assert len(plain) >= 3 and plain[-1] < plain[0]
    for name in ("chunked", "checkpointed"):
        assert losses(runs[name].run_dir) == pytest.approx(plain, rel=1e-4), name
        assert runs[name].metrics["test"]["perplexity"] == pytest.approx(runs["plain"].metrics["test"]["perplexity"],
                                                                          rel=1e-4)
    # Under peft (LoRA wraps the model first; the loss is installed on the wrapped model, tied output layer).
    assert losses(runs["lora"].run_dir) == pytest.approx(losses(runs["lora_plain"].run_dir), rel=1e-4)


def test_lora_on_an_untied_decoder_gets_the_chunked_loss(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """LoRA leaves a pretrained untied output layer frozen (a plain linear layer, not peft's trained copy), so the
    chunked loss applies, with the same losses as the model's own."""
    from helpers import make_tiny_decoder

    folder = make_tiny_decoder(tmp_path / "untied", tied=False)
    runs = {}
    for chunk in (None, 5):
        cfg = lm_config(folder, tmp_path)
        cfg["task"]["loss_chunk"] = chunk
        cfg["method"] = {"name": "lora", "dropout": 0.0}
        cfg["train"].update(epochs=1, lr=1e-2)
        cfg["eval"] = {}
        cfg["output"]["name"] = f"untied-{chunk}"
        runs[chunk] = lmtune.train(cfg)
    assert "the model's own loss is used" not in caplog.text
    assert losses(runs[5].run_dir) == pytest.approx(losses(runs[None].run_dir), rel=1e-4)


def test_an_untied_output_layer_held_in_bf16_gives_fp32_logits_outside_autocast(tmp_path: Path) -> None:
    """A GPU adapter run holds a frozen untied output layer in bf16 (training/frozen.py) while the chunked loss is
    installed on it: an evaluation or generation outside autocast passes fp32 hidden states through it."""
    from transformers import AutoModelForCausalLM

    from helpers import make_tiny_decoder
    from lmtune.training.frozen import hold_frozen_linear

    model = AutoModelForCausalLM.from_pretrained(make_tiny_decoder(tmp_path / "untied", tied=False)).requires_grad_(False)
    ids = torch.tensor([[3, 4, 5, 6]])
    undo = lm_loss.install(model, 3)
    assert callable(undo)
    hold_frozen_linear(model, torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.dtype == torch.float32 and logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()
