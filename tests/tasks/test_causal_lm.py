"""Causal-LM domain adaptation: packing without cross-document attention, perplexity, replay, forgetting."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import lmtune
from helpers import write_jsonl
from lmtune.data import DataError
from lmtune.data.text import pack, read_documents
from lmtune.tasks import lm_common

DOCS = ["the film was good and i loved it", "bad drug , awful night", "one two three four five six",
        "people love this story very much", "the doctor worked all day"]


def load(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder).eval()


def test_pack_restarts_positions_and_splits_long_documents() -> None:
    rows = pack([[1, 2, 3], [4, 5, 6, 7, 8], [9]], 4)
    assert [r["input_ids"] for r in rows] == [[1, 2, 3, 4], [5, 6, 7, 8], [9]]
    assert [r["position_ids"] for r in rows] == [[0, 1, 2, 0], [0, 1, 2, 3], [0]]


def other_geometry(name: str, vocab_size: int):
    """A tiny random GPT-2 or Qwen2 in memory: the mask must work beyond Llama."""
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if name == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1,
                                        max_position_embeddings=64)).eval()


@pytest.mark.parametrize("geometry", ["llama", "gpt2", "qwen2", "llama-eager"])
def test_packed_batch_does_not_attend_across_documents(geometry: str, tiny_decoder_dir: Path) -> None:
    tokenizer, model = load(tiny_decoder_dir)
    if geometry == "llama-eager":  # eager attention adds its mask to the scores: lmtune's loader makes it additive
        from transformers import AutoModelForCausalLM

        from lmtune.config import ModelConfig
        from lmtune.models import load_model

        model = load_model(AutoModelForCausalLM, ModelConfig(name=str(tiny_decoder_dir)),
                           attn_implementation="eager")[0].eval()
        assert model.config._attn_implementation == "eager"
    elif geometry != "llama":
        model = other_geometry(geometry, len(tokenizer))
    docs = lm_common.tokenize_documents(DOCS, tokenizer)
    rows = pack(docs, 16)
    batch = lm_common.collate_rows(tokenizer, 8)(rows)
    assert batch["attention_mask"].shape == (len(rows), 1, 16, 16)
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        # Row 0 holds document 0 (9 tokens) then the start of document 1: each must match the document alone.
        for doc, start in ((0, 0), (1, len(docs[0]))):
            n = min(len(docs[doc]), 16 - start)
            alone = model(input_ids=torch.tensor([docs[doc][:n]])).logits
            assert torch.allclose(packed[0, start:start + n], alone[0], atol=1e-5)
    # The first token of a document is never a target (not predicted from the previous document's EOS).
    assert (batch["labels"][batch["position_ids"] == 0] == -100).all()
    assert tokenizer.eos_token_id in batch["labels"][0].tolist()  # the model learns where documents end


def test_perplexity_sums_token_losses(tiny_decoder_dir: Path) -> None:
    from types import SimpleNamespace

    batches = [(None, SimpleNamespace(loss=torch.tensor(1.0)), {"labels": torch.tensor([[-100, 5, 5, 5]])}),
               (None, SimpleNamespace(loss=torch.tensor(2.0)), {"labels": torch.tensor([[-100, 5, -100, -100]])})]
    result = lm_common.perplexity(batches)
    assert result["loss"] == pytest.approx((3 * 1.0 + 1 * 2.0) / 4)
    assert result["perplexity"] == pytest.approx(math.exp(5 / 4))


def test_grad_accumulation_normalises_per_target_token(tiny_decoder_dir: Path) -> None:
    """Two micro-batches with very different target counts accumulate to the gradient of one batch of both."""
    from accelerate import Accelerator

    from lmtune.training.losses import window_scales

    tokenizer, model = load(tiny_decoder_dir)
    collate = lm_common.collate_rows(tokenizer, 1)
    docs = lm_common.tokenize_documents(DOCS, tokenizer)
    small = [{"input_ids": docs[1][:3], "position_ids": [0, 1, 2]}]
    big = pack(docs, 12)[:3]
    both = collate(small + big)  # padding is a segment of its own: it changes no real token's output
    parts = [collate(small), collate(big)]
    assert int(lm_common.count_targets(parts[1])) > 5 * int(lm_common.count_targets(parts[0]))
    model.zero_grad()
    model(**both).loss.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    scales = window_scales(torch.stack([lm_common.count_targets(p) for p in parts]).float(), Accelerator(cpu=True))
    for part, scale in zip(parts, scales):
        (model(**part).loss * scale).backward()
    for got, want in zip((p.grad for p in model.parameters()), expected):
        assert torch.allclose(got, want, atol=1e-6)


def test_read_documents_txt_and_blank_line(tmp_path: Path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("first doc\n\nsecond doc\nstill second\n\n\nthird\n", encoding="utf-8")
    assert read_documents(str(txt))["text"][:] == ["first doc", "second doc", "still second", "third"]
    blank = read_documents(str(txt), documents="blank_line")
    assert blank["text"][:] == ["first doc", "second doc\nstill second", "third"] and blank["_row"][:] == [1, 3, 7]
    odd = tmp_path / "odd.txt"  # a line separator or form feed inside a line does not end it
    odd.write_text("one\u2028still one\x0cand one\nthird line\n", encoding="utf-8")
    lines = read_documents(str(odd))
    assert lines["text"][:] == ["one\u2028still one\x0cand one", "third line"] and lines["_row"][:] == [1, 2]
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfFirst doc.\nsecond\n")  # an editor's byte-order mark
    assert read_documents(str(tmp_path / "bom.txt"))["text"][:] == ["First doc.", "second"]
    (tmp_path / "latin.txt").write_bytes("ok\nstill ok\nna\u00efve\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.txt, line 3: not UTF-8 text \(invalid continuation byte at byte 3 of"):
        read_documents(str(tmp_path / "latin.txt"))
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty.txt: no documents"):
        read_documents(str(tmp_path / "empty.txt"))
    bad = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine"}, {"text": ""}])
    with pytest.raises(DataError, match=r"d.jsonl, row 2, field 'text': empty text"):
        read_documents(str(bad))


def test_read_documents_skips_malformed_table_lines_under_skip(tmp_path: Path) -> None:
    tsv = tmp_path / "d.tsv"
    tsv.write_text("text\tsource\nfirst doc\tweb\nstray\ttab\tweb\n\tweb\nlast doc\tweb\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d.tsv, line 3: 3 fields where the header has 2.*data.on_bad_rows=skip"):
        read_documents(str(tsv))
    skipped: list[str] = []
    docs = read_documents(str(tsv), on_bad_rows="skip", skipped=skipped)
    assert docs["text"][:] == ["first doc", "last doc"] and docs["_row"][:] == [1, 4]
    assert len(skipped) == 2 and "line 3: 3 fields" in skipped[0] and "row 3, field 'text'" in skipped[1]


def test_split_by_is_refused_not_ignored(tmp_path: Path) -> None:
    from types import SimpleNamespace

    cfg = SimpleNamespace(train=str(tmp_path / "t.txt"), split_by="title")
    with pytest.raises(DataError, match="data.split_by: this task splits documents off at random"):
        lm_common.read_splits(lambda path, skipped: None, cfg, seed=0)


def lm_config(model_dir: Path, tmp_path: Path, **data) -> dict:
    train = tmp_path / "train.txt"
    train.write_text("\n".join(DOCS * 8) + "\n", encoding="utf-8")
    general = tmp_path / "general.txt"
    general.write_text("\n".join(["the story of one people in the year", "music and acting at night"] * 5) + "\n",
                       encoding="utf-8")
    return {"model": {"name": str(model_dir), "max_length": 16},
            "data": {"train": str(train), "validation_size": 4, "test_size": 4, **data},
            "task": {"name": "causal_lm", "max_new_tokens": 5},
            "method": {"name": "full"},
            "train": {"epochs": 2, "batch_size": 4, "lr": 3e-3, "warmup_ratio": 0.0, "log_every": 1},
            "eval": {"general_text": str(general)},
            "output": {"dir": str(tmp_path / "runs"), "name": "lm", "overwrite": True}}


@pytest.mark.parametrize("method", ["head", "lp_ft"])
def test_head_methods_on_an_untied_decoder_train_its_output_layer(method: str, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    from safetensors.torch import load_file

    from helpers import make_tiny_decoder

    model_dir = make_tiny_decoder(tmp_path / "untied", tied=False)
    cfg = lm_config(model_dir, tmp_path)
    cfg["eval"] = {}
    cfg["method"] = {"name": method, **({"probe_epochs": 1, "epochs": 1} if method == "lp_ft" else {})}
    with caplog.at_level("INFO", logger="lmtune"):
        result = lmtune.train(cfg)
    assert "features not cached: the batches carry no per-token padding mask" in caplog.text
    before, after = load_file(str(model_dir / "model.safetensors")), load_file(str(result.run_dir / "model" / "model.safetensors"))
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])
    if method == "head":
        assert all(torch.equal(v, after[k]) for k, v in before.items() if k != "lm_head.weight")


def test_lora_on_an_untied_decoder_leaves_its_pretrained_output_layer_frozen(tmp_path: Path) -> None:
    # Adapters adapt the language model; its pretrained output layer is no new head to train whole (at 8B: 525 M
    # parameters with fp32 gradients and AdamW moments). (The chunked loss it keeps: tests/tasks/test_lm_loss.py.)
    from helpers import make_tiny_decoder

    model_dir = make_tiny_decoder(tmp_path / "untied", tied=False)
    cfg = lm_config(model_dir, tmp_path)
    cfg["eval"] = {}
    cfg["method"] = {"name": "lora", "r": 4}
    result = lmtune.train(cfg)
    config = json.loads((model_dir / "config.json").read_text())
    assert result.metrics["params"]["trainable"] < config["vocab_size"] * config["hidden_size"]  # no lm_head copy


def test_domain_adaptation_lowers_perplexity_and_measures_forgetting(tiny_decoder_dir: Path, tmp_path: Path) -> None:
    result = lmtune.train(lm_config(tiny_decoder_dir, tmp_path,
                                    replay={"path": str(tmp_path / "general.txt"), "ratio": 0.2}))
    metrics = result.metrics
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    ppl = [r["eval/perplexity"] for r in records if "eval/perplexity" in r]
    assert ppl[-1] < ppl[0] and metrics["test"]["perplexity"] == pytest.approx(math.exp(metrics["test"]["loss"]))
    forgetting = metrics["forgetting"]
    assert forgetting["perplexity_before"] > 0 and forgetting["perplexity_after"] > 0
    assert forgetting["relative_change"] == pytest.approx(
        forgetting["perplexity_after"] / forgetting["perplexity_before"] - 1)
    replay = metrics["data"]["replay"]
    assert replay["documents"] > 0 and 0.1 < replay["share"] < 0.5
    predictor = lmtune.load(result.run_dir)
    out = predictor.predict(["the film", {"text": "bad drug"}])
    assert len(out) == 2 and all(isinstance(o["generated"], str) for o in out)
    scored = lmtune.evaluate(result.run_dir, tmp_path / "general.txt")
    assert scored["perplexity"] > 1 and scored["tokens"] > 0


def test_general_text_needs_a_causal_lm(tiny_config: dict, tmp_path: Path) -> None:
    from lmtune.config import ConfigError

    (tmp_path / "g.txt").write_text("some text\n", encoding="utf-8")
    tiny_config["eval"] = {"general_text": str(tmp_path / "g.txt")}
    with pytest.raises(ConfigError, match="general_text measures a causal LM"):
        lmtune.train(tiny_config)


def test_lora_saves_adapter_only_and_merged_export_generates_the_same(tiny_decoder_dir: Path, tmp_path: Path) -> None:
    cfg = lm_config(tiny_decoder_dir, tmp_path)
    cfg["method"] = {"name": "lora", "r": 4}
    cfg["eval"] = {}
    cfg["train"].update(max_steps=4, lr=2e-2)
    result = lmtune.train(cfg)
    assert (result.run_dir / "model" / "adapter_config.json").is_file()
    assert not any((result.run_dir / "model").glob("model*.safetensors"))
    predictor = lmtune.load(result.run_dir)
    prompts = ["the film", "bad drug , awful"]
    tuned = [o["generated"] for o in predictor.predict(prompts)]
    merged = lmtune.predict.export(result.run_dir, tmp_path / "merged")
    tokenizer, model = load(merged)
    assert lm_common.generate(model, tokenizer, prompts, predictor.session.task.options, "cpu") == tuned


def test_replay_smaller_than_its_share_is_reused_to_meet_the_ratio() -> None:
    from lmtune.tasks.lm_common import choose_replay

    sizes = [10, 10, 10]  # 30 tokens; a ratio of 0.5 over 90 task tokens wants 90
    chosen = choose_replay(90, sizes, 0.5, seed=0).tolist()
    assert len(chosen) == 9 and all(chosen.count(i) == 3 for i in range(3))  # each pass takes every document once
    assert sorted(choose_replay(30, sizes, 0.5, seed=0).tolist()) == [0, 1, 2]  # wants 30: one pass, no doc twice
    assert sorted(choose_replay(25, sizes, 0.5, seed=0).tolist()) == [0, 1, 2]  # 25 wanted: the third one crosses it
    assert len(choose_replay(20, sizes, 0.5, seed=0)) == 2
    assert len(choose_replay(30, [], 0.5, seed=0)) == 0


def test_lora_warns_of_untrained_output_rows_and_can_train_the_output_layer(tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    # A base checkpoint whose output row for a token is untrained (near zero: Llama-3 base's <|eot_id|>) cannot learn
    # to produce it under LoRA's frozen output layer: the run says so, and method.train_output_layer trains it.
    from safetensors.torch import load_file, save_file

    from helpers import make_tiny_decoder

    model_dir = make_tiny_decoder(tmp_path / "untied", tied=False)
    weights = load_file(str(model_dir / "model.safetensors"))
    weights["lm_head.weight"][2] = 0.0  # <eos>: every document ends with it
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = lm_config(model_dir, tmp_path)
    cfg["eval"] = {}
    cfg["method"] = {"name": "lora", "r": 4}
    with caplog.at_level("WARNING", logger="lmtune"):
        frozen = lmtune.train(cfg)
    assert "the training targets hold 1 token(s) whose output rows this checkpoint never trained (near zero), ids [2]" \
        in caplog.text
    assert "method.train_output_layer=true" in caplog.text
    caplog.clear()
    cfg["method"]["train_output_layer"] = True
    cfg["output"]["name"] = "trained-output"
    with caplog.at_level("WARNING", logger="lmtune"):
        trained = lmtune.train(cfg)
    assert "untrained" not in caplog.text
    config = json.loads((model_dir / "config.json").read_text())
    head = config["vocab_size"] * config["hidden_size"]
    assert frozen.metrics["params"]["trainable"] < head <= trained.metrics["params"]["trainable"]


def test_train_output_layer_is_refused_where_the_output_layer_is_tied(tiny_decoder_dir: Path, tmp_path: Path) -> None:
    cfg = lm_config(tiny_decoder_dir, tmp_path)
    cfg["method"] = {"name": "lora", "train_output_layer": True}
    with pytest.raises(lmtune.ConfigError, match="train_output_layer: this LlamaForCausalLM has no separate output "
                                                 "layer \\(it is tied to the input embeddings\\)"):
        lmtune.train(cfg)


def test_a_prompt_longer_than_the_models_positions_keeps_its_end(tiny_decoder_dir: Path, caplog) -> None:
    """A model with learned positions (GPT-2: 32 here) indexed past its table on a long prompt (IndexError in predict,
    serve and eval_generate); the prompt's beginning is cut instead, with a warning, and max_new_tokens holds."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_decoder_dir)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, n_positions=32,
                                       eos_token_id=2, pad_token_id=0))
    options = lm_common.GenerationOptions(max_new_tokens=4)
    with caplog.at_level("WARNING", logger="lmtune"):
        short, long = lm_common.generate(model, tokenizer, ["good film", " ".join(["good film"] * 40)], options, "cpu")
    assert "1 prompt(s) longer than the 28 tokens" in caplog.text
    assert len(long.split()) <= 4 and len(short.split()) <= 4
    assert tokenizer.truncation_side == "right"  # put back
    with pytest.raises(ValueError, match="max_new_tokens=40: the model has 32 positions"):
        lm_common.generate(model, tokenizer, ["good film"], lm_common.GenerationOptions(max_new_tokens=40), "cpu")
