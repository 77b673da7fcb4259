"""Instruction tuning: chat formatting, assistant-only labels, validation, too-long policy, stopping, scoring."""

from __future__ import annotations

import json

from pathlib import Path

import pytest

import lmtune
from helpers import make_tiny_decoder, write_csv, write_jsonl
from lmtune.config import DataConfig
from lmtune.data import DataError
from lmtune.tasks.instruct import Instruct, InstructOptions
from lmtune.tasks.lm_common import normalise, pick_choice, score_generations

CHAT = [{"role": "system", "content": "be short"}, {"role": "user", "content": "good film"},
        {"role": "assistant", "content": "positive"}, {"role": "user", "content": "bad drug"},
        {"role": "assistant", "content": "negative"}]


def task(path: Path | None = None, **options) -> Instruct:
    return Instruct(InstructOptions(**options), DataConfig(train=str(path) if path else None))


def tokenizer_of(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_labels_cover_assistant_replies_and_their_end_of_turn(tiny_decoder_dir: Path) -> None:
    tok = tokenizer_of(tiny_decoder_dir)
    ids, labels = task()._tokenize(tok, CHAT)
    targets = tok.convert_ids_to_tokens([t for t in labels if t != -100])
    assert targets == ["positive", "<|im_end|>", "negative", "<|im_end|>"]
    ids_all, labels_all = task(loss_on="all")._tokenize(tok, CHAT)
    assert labels_all == ids_all == ids


def test_default_template_when_the_tokenizer_has_none(tmp_path: Path) -> None:
    tok = tokenizer_of(make_tiny_decoder(tmp_path / "plain", chat_template=None))
    _, labels = task()._tokenize(tok, CHAT[1:3])
    assert tok.convert_ids_to_tokens([t for t in labels if t != -100]) == ["positive", "<eos>"]


@pytest.mark.parametrize("row, where", [
    ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}, "field 'messages[0].role': missing role"),
    ({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}]},
     "field 'messages[0].content': empty content"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "field 'messages[0].role': unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "field 'messages': no assistant turn"),
])
def test_bad_chats_name_file_row_and_field(tmp_path: Path, row: dict, where: str) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, row])
    with pytest.raises(DataError, match=f"chat.jsonl, row 2, {where}".replace("[", r"\[").replace("]", r"\]")):
        task(path).load_splits(0)


def test_instruction_rows_and_too_long_policy(tiny_decoder_dir: Path, tmp_path: Path) -> None:
    long = " ".join(["very"] * 60)
    path = write_jsonl(tmp_path / "inst.jsonl", [{"instruction": "rate it", "input": "good film", "output": "positive"},
                                                 {"instruction": long, "input": "", "output": "negative"}])
    t = task(path)
    ds = t._read(str(path))
    assert ds["messages"][0][0] == {"role": "user", "content": "rate it\n\ngood film"}
    tok = tokenizer_of(tiny_decoder_dir)
    assert len(t.encode(ds, tok, 32)) == 1  # the long one's reply would be cut off: dropped and counted
    assert t.encode_report["too_long"][str(path)] == {"examples": 2, "truncated": 0, "dropped": 1}
    only_long = write_jsonl(tmp_path / "long.jsonl", [{"instruction": long, "output": "negative"}])
    with pytest.raises(DataError, match=r"long.jsonl: every example \(1\) is longer than model.max_length=32"):
        task(only_long, too_long="drop").encode(t._read(str(only_long)), tok, 32)


def test_self_instruct_rows_read_as_their_first_instance(tmp_path: Path) -> None:
    """Self-instruct's rows (`instruction` + `instances: [{input, output}]`, e.g. the user-oriented evaluation set)."""
    path = write_jsonl(tmp_path / "si.jsonl", [
        {"id": "t0", "instruction": "Rewrite it.", "instances": [{"input": "a b", "output": "b a"}, {"input": "x"}]},
        {"id": "t1", "instruction": "Name a colour.", "instances": [{"input": "", "output": "red"}]}])
    ds = task(path)._read(str(path))
    assert ds["messages"] == [[{"role": "user", "content": "Rewrite it.\n\na b"}, {"role": "assistant", "content": "b a"}],
                              [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "red"}]]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "x", "instances": [{"input": "y"}]}])
    with pytest.raises(DataError, match="bad.jsonl, row 1, field 'output'"):
        task(bad)._read(str(bad))


def test_scoring_normalises_and_picks_choices() -> None:
    assert normalise("  Positive!\n") == "positive"
    assert pick_choice("I think it is negative, not positive", ["positive", "negative"]) == "negative"
    assert pick_choice("good movie, I say", ["good", "good movie"]) == "good movie"  # the longer at one place
    assert score_generations(["Paris.", "rome"], ["paris", "Berlin"], None)["exact_match"] == 0.5
    scores = score_generations(["positive!", "hmm"], ["positive", "negative"], ["positive", "negative"])
    assert scores["accuracy"] == 0.5 and scores["no_choice_rate"] == 0.5


def test_tuned_chat_model_answers_and_stops(tiny_decoder_dir: Path, tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in [("good film", "positive great"), ("bad drug", "negative awful")] * 16]
    train = write_jsonl(tmp_path / "chat.jsonl", rows)
    test = write_csv(tmp_path / "test.csv", [{"text": "good film", "label": "positive"},
                                             {"text": "bad drug", "label": "negative"}])
    cfg = {"model": {"name": str(tiny_decoder_dir)}, "data": {"train": str(train), "validation_size": 2,
                                                               "test_size": 0},
           "task": {"name": "instruct", "max_new_tokens": 8}, "method": {"name": "full"},
           "train": {"epochs": 6, "batch_size": 4, "lr": 1e-2, "warmup_ratio": 0.0},
           "output": {"dir": str(tmp_path / "runs"), "name": "chat"}}
    result = lmtune.train(cfg)
    predictor = lmtune.load(result.run_dir)
    out = predictor.predict(["good film", {"messages": [{"role": "user", "content": "bad drug"}]}])
    assert [o["generated"] for o in out] == ["positive great", "negative awful"]  # stopped at <|im_end|>
    scores = lmtune.evaluate(result.run_dir, train)["generation"]
    assert scores["exact_match"] == 1.0
    # The same model scored on a labelled table through a prompt template and answer choices.
    tmpl = Instruct(InstructOptions(prompt_template="{text}", answer_choices=["positive", "negative"]),
                    DataConfig(train=str(test)))
    assert tmpl.score_generations(tmpl._read(str(test)), predictor.session.generate)["accuracy"] == 1.0


@pytest.mark.parametrize("name", ["imdb_domain", "instruct_sst2", "chat"])
def test_decoder_example_configs_are_valid(name: str) -> None:
    from lmtune.config import load_config

    cfg = load_config(Path(__file__).parents[2] / "examples" / f"{name}.yaml")
    assert cfg.model.name == "smollm2-135m" and cfg.task.name in ("causal_lm", "instruct")


def test_chat_sample_reads(tmp_path: Path) -> None:
    path = Path(__file__).parents[2] / "examples" / "data" / "chat_sample.jsonl"
    assert len(task(path)._read(str(path))) == 11


def test_template_rows_from_a_tsv_take_label_map_names(tmp_path: Path) -> None:
    tsv = tmp_path / "sst.tsv"  # GLUE's layout: labels 0/1, renamed as examples/instruct_sst2.yaml does
    tsv.write_text("sentence\tlabel\ngood film\t1\nbad film\t0\n", encoding="utf-8")
    t = Instruct(InstructOptions(prompt_template="Review: {sentence}"),
                 DataConfig(label_column="label", label_map={0: "negative", 1: "positive"}))
    chats = t._read(str(tsv))["messages"][:]
    assert [c[-1]["content"] for c in chats] == ["positive", "negative"]


def test_template_labels_read_as_text_the_way_the_map_keys_do(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"  # one 1.0 makes the JSON reader turn the column into floats
    path.write_text('{"s": "good", "label": 1}\n{"s": "bad", "label": 0.0}\n{"s": "fine", "label": 1.0}\n')
    t = Instruct(InstructOptions(prompt_template="Review: {s}"),
                 DataConfig(train=str(path), label_column="label", label_map={0: "negative", 1: "positive"}))
    assert [c[-1]["content"] for c in t._read(str(path))["messages"][:]] == ["positive", "negative", "positive"]
    unmapped = Instruct(InstructOptions(prompt_template="Review: {s}"),
                        DataConfig(train=str(path), label_column="label", label_map={"yes": "positive"}))
    with pytest.raises(DataError, match=r"no key of data.label_map \(yes\) is a label of this file \(its labels: 0, 1"):
        unmapped._read(str(path))
    assert [c[-1]["content"] for c in t.__class__(InstructOptions(prompt_template="Review: {s}"), DataConfig(
        label_column="label"))._read(str(path))["messages"][:]] == ["1", "0", "1"]


def test_predict_inputs_for_a_template_task() -> None:
    t = Instruct(InstructOptions(prompt_template="Review: {sentence}"), DataConfig(label_column="label"))
    chats = t.from_texts(["nice", {"sentence": "bad", "messages": None},
                          {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}])
    assert chats == [[{"role": "user", "content": "Review: nice"}], [{"role": "user", "content": "Review: bad"}],
                     [{"role": "user", "content": "hi"}]]
    with pytest.raises(DataError, match=r"input, row 1, field 'messages\[0\].role': unknown role 'bot'"):
        t.from_texts([{"messages": [{"role": "bot", "content": "hi"}]}])
    plain = Instruct(InstructOptions(), DataConfig())
    for bad, why in (([], "non-empty list"), ("hi", "non-empty list"), ([{"role": "assistant", "content": "x"}],
                                                                         "no turn before")):
        with pytest.raises(DataError, match=rf"input, row 2, field 'messages'.*{why}"):  # not a library's error
            plain.from_texts(["fine", {"messages": bad}])


def test_replay_adds_general_text_rows_with_full_loss(tiny_decoder_dir: Path, tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": "good film"}, {"role": "assistant", "content": "positive"}]}] * 10
    general = tmp_path / "general.txt"
    general.write_text("the story of one people in the year\nmusic and acting at night\n" * 10, encoding="utf-8")
    t = Instruct(InstructOptions(), DataConfig(train=str(write_jsonl(tmp_path / "c.jsonl", rows)), validation_size=2,
                                               test_size=0, replay={"path": str(general), "ratio": 0.25}))
    splits, _ = t.load_splits(0)
    assert len(splits["validation"]) == 2 and len(splits["train"]) == 8 + 20
    features = t.encode(splits["train"], tokenizer_of(tiny_decoder_dir), 64)
    replay = t.encode_report["replay"]
    assert 0.2 < replay["share"] < 0.4 and len(features) == 8 + replay["documents"]
    assert features["labels"][-1] == features["input_ids"][-1]  # plain text: every token is a target


def test_generation_pads_with_eos_when_the_tokenizer_has_no_pad(tiny_decoder_dir: Path) -> None:
    from lmtune.tasks.lm_common import generate

    tok = tokenizer_of(tiny_decoder_dir)
    tok.pad_token = None
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir)
    out = generate(model, tok, ["the film", "bad drug , awful night"], InstructOptions(max_new_tokens=3), "cpu")
    assert len(out) == 2 and tok.pad_token is None and tok.padding_side == "right"


def test_eval_table_shows_the_generation_scores() -> None:
    from rich.console import Console

    from lmtune.listing import metrics_table

    console = Console(width=120, record=True)
    console.print(metrics_table("t", {"loss": 1.5, "rows": 3, "generation": {"accuracy": 0.5, "no_choice_rate": 0.25}}))
    text = console.export_text()
    assert "generation/accuracy" in text and "0.5000" in text and "generation/no_choice_rate" in text


def test_general_chat_probe_scores_reply_tokens_before_and_after(tiny_decoder_dir: Path, tmp_path: Path) -> None:
    """eval.general_chat: the reply loss before training equals a hand computation over the reply tokens alone."""
    import torch
    from transformers import AutoModelForCausalLM

    train = [{"messages": [{"role": "user", "content": "good film"}, {"role": "assistant", "content": "positive"}]},
             {"messages": [{"role": "user", "content": "bad drug"}, {"role": "assistant", "content": "negative"}]}] * 8
    chats = [[{"role": "user", "content": "the music at night"}, {"role": "assistant", "content": "one story"}],
             [{"role": "user", "content": "acting"}, {"role": "assistant", "content": "the people in the year"}]]
    general = write_jsonl(tmp_path / "general.jsonl", [{"messages": c} for c in chats])
    cfg = {"model": {"name": str(tiny_decoder_dir), "max_length": 64},
           "data": {"train": str(write_jsonl(tmp_path / "t.jsonl", train)), "validation_size": 0, "test_size": 0},
           "task": {"name": "instruct", "max_new_tokens": 4}, "method": {"name": "full"},
           "eval": {"general_chat": str(general)},
           "train": {"epochs": 2, "batch_size": 4, "lr": 1e-2}, "output": {"dir": str(tmp_path / "runs"), "name": "c"}}
    forgetting = lmtune.train(cfg).metrics["forgetting"]
    tok = tokenizer_of(tiny_decoder_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for chat in chats:  # the reply and its end of turn: the characters after the prompt's generation marker
        text = tok.apply_chat_template(chat, tokenize=False)
        start = len(tok.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True))
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.tensor([enc["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        for position, (a, _) in enumerate(enc["offset_mapping"][1:], 1):
            if a >= start:
                total -= float(logp[position - 1, ids[0, position]])
                count += 1
    assert forgetting["general_chat_loss_before"] == pytest.approx(total / count, rel=1e-4)
    assert forgetting["general_chat_loss_after"] != forgetting["general_chat_loss_before"]
    samples = forgetting["general_chat"]["samples"]
    assert [s["prompt"] for s in samples] == ["the music at night", "acting"] and all("after" in s for s in samples)


def test_general_chat_of_a_templated_run_reads_its_file_as_chats(tiny_decoder_dir: Path, tmp_path: Path) -> None:
    """A run that turns a labelled table into chats (task.prompt_template) still reads eval.general_chat as chats:
    its template names the table's columns, which the reference set does not have (here self-instruct rows)."""
    train = write_csv(tmp_path / "t.csv", [{"sentence": "good film", "label": "1"},
                                               {"sentence": "bad drug", "label": "0"}] * 8)
    general = write_jsonl(tmp_path / "general.jsonl", [
        {"instruction": "Name a colour.", "instances": [{"input": "", "output": "red"}]},
        {"instruction": "Say hi.", "instances": [{"input": "twice", "output": "hi hi"}]}])
    cfg = {"model": {"name": str(tiny_decoder_dir), "max_length": 64},
           "data": {"train": str(train), "validation_size": 0, "test_size": 0, "label_map": {0: "negative", 1: "positive"}},
           "task": {"name": "instruct", "prompt_template": "Review: {sentence}", "answer_choices": ["positive", "negative"],
                    "max_new_tokens": 4},
           "method": {"name": "full"}, "eval": {"general_chat": str(general)},
           "train": {"epochs": 1, "batch_size": 4, "lr": 1e-2}, "output": {"dir": str(tmp_path / "runs"), "name": "c"}}
    forgetting = lmtune.train(cfg).metrics["forgetting"]
    assert forgetting["general_chat"]["conversations"] == 2
    assert [s["prompt"] for s in forgetting["general_chat"]["samples"]] == ["Name a colour.", "Say hi.\n\ntwice"]


def _chats(n: int) -> list[dict]:
    words = ["good film", "bad drug", "the music at night", "acting", "one story of the people in the year"]
    return [{"messages": [{"role": "user", "content": words[i % 5]},
                          {"role": "assistant", "content": "positive" if i % 2 else "negative"}]} for i in range(n)]


def test_packed_conversations_attend_only_to_themselves(tiny_decoder_dir: Path, tmp_path: Path) -> None:
    """Each conversation's reply loss inside a packed row equals its loss alone: a leaking mask would change it."""
    import torch
    from transformers import AutoModelForCausalLM

    from lmtune.tasks.lm_common import collate_rows

    path = write_jsonl(tmp_path / "c.jsonl", _chats(6))
    tok = tokenizer_of(tiny_decoder_dir)
    plain = task(path, packing=False)
    packed = task(path, packing=True)
    alone = plain.encode(plain.load_splits(0)[0]["train"], tok, 64)
    rows = packed.encode(packed.load_splits(0)[0]["train"], tok, 64)
    assert len(rows) < len(alone) and packed.encode_report["packing"] == {"examples": len(alone), "rows": len(rows)}
    assert sum(p.count(0) for p in rows["position_ids"]) == len(alone)  # one restart per conversation
    assert all(p[0] == 0 for p in rows["position_ids"]) and all(len(r) <= 64 for r in rows["input_ids"])
    model = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir, dtype=torch.float32).eval()

    def token_losses(features) -> dict[tuple, list[float]]:
        """Per conversation (its ids), the loss of each target token, in order."""
        batch = collate_rows(tok, 8)([features[i] for i in range(len(features))])
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        out = {}
        for i in range(len(features)):
            ids, labels = batch["input_ids"][i], batch["labels"][i]
            starts = (batch["position_ids"][i] == 0).nonzero().flatten().tolist() if "position_ids" in batch else [0]
            n = len(features[i]["input_ids"])
            starts = [s for s in starts if s < n]  # (padding restarts its positions too)
            for s, e in zip(starts, starts[1:] + [n]):
                logp = torch.log_softmax(logits[i, s:e - 1].float(), -1)
                targets = labels[s + 1:e]
                out[tuple(ids[s:e].tolist())] = [float(-logp[t, targets[t]]) for t in range(len(targets))
                                                 if targets[t] != -100]
        return out

    separate, together = token_losses(alone), token_losses(rows)
    assert set(separate) == set(together)
    for key in separate:
        assert together[key] == pytest.approx(separate[key], abs=1e-4)


def test_packed_rows_keep_the_loss_on_replies(tiny_decoder_dir: Path, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", _chats(6))
    tok = tokenizer_of(tiny_decoder_dir)
    plain, packed = task(path), task(path, packing=True)
    alone = plain.encode(plain.load_splits(0)[0]["train"], tok, 64)
    rows = packed.encode(packed.load_splits(0)[0]["train"], tok, 64)
    targets = sorted(t for labels in alone["labels"] for t in labels[1:] if t != -100)
    assert sorted(t for labels in rows["labels"] for t in labels if t != -100) == targets
    cfg = {"model": {"name": str(tiny_decoder_dir), "max_length": 64},
           "data": {"train": str(write_jsonl(tmp_path / "t.jsonl", _chats(40))), "validation_size": 0.2,
                    "test_size": 0},
           "task": {"name": "instruct", "packing": True}, "method": {"name": "full"},
           "train": {"epochs": 3, "batch_size": 4, "lr": 1e-2}, "output": {"dir": str(tmp_path / "runs"), "name": "p"}}
    result = lmtune.train(cfg)
    assert result.metrics["data"]["packing"]["rows"] < result.metrics["data"]["packing"]["examples"]
    curve = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in curve if "train/loss" in r]
    assert losses[-1] < losses[0]
