"""NER: readers and tag schemes, bad input by file and line, alignment, windows, seqeval metrics, spans, pipeline."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

import lmtune
from helpers import SHARED_DATA
from lmtune.config import load_config
from lmtune.data import DataError
from lmtune.data.conll import NerReadOptions, TagError, read_ner, to_bio
from lmtune.registry import TASKS
from lmtune.evaluation.entities import entity_scores
from lmtune.tasks.ner_words import owned_ranges, plan_windows, split_words

# Easy synthetic NER: every word has one tag, so a tiny model learns it in seconds.
LEXICON = {"B-PER": ["doctor", "actor"], "I-PER": ["people", "thing"], "B-LOC": ["night", "day"],
           "I-LOC": ["week", "month", "year"]}
FILLER = "the a an and or but not is was are were it this that in met said 's , ( ) ! .".split()  # met, said: [UNK]


def synthetic(n: int, seed: int) -> list[tuple[list[str], list[str]]]:
    rng = random.Random(seed)
    sentences = []
    for _ in range(n):
        tokens, tags = [], []
        for _ in range(rng.randint(1, 3)):
            for word in rng.sample(FILLER, rng.randint(1, 3)):
                tokens.append(word)
                tags.append("O")
            kind = rng.choice(["PER", "LOC"])
            for k in range(rng.randint(1, 2)):
                tag = ("B-" if k == 0 else "I-") + kind
                tokens.append(rng.choice(LEXICON[tag]))
                tags.append(tag)
        sentences.append((tokens, tags))
    return sentences


def write_conll(path: Path, sentences: list[tuple[list[str], list[str]]]) -> Path:
    blocks = ["\n".join(f"{t} NN {g}" for t, g in zip(tokens, tags)) for tokens, tags in sentences]
    path.write_text("-DOCSTART- -X- O\n\n" + "\n\n".join(blocks) + "\n")
    return path


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def read(path: Path, **options) -> tuple:
    return read_ner(path, NerReadOptions(**options))


def task(cfg: dict, labels: list[str] | None = None):
    config = load_config({"task": {"name": "ner"}, **cfg})
    return TASKS["ner"](config.task, config.data, labels=labels)


def read_error(path: Path, **options) -> DataError:
    with pytest.raises(DataError) as info:
        read(path, **options)
    return info.value


# ---- readers and schemes -------------------------------------------------------------------------
def test_conll_reader_docstart_blank_lines_any_whitespace(tmp_path: Path) -> None:
    text = ("-DOCSTART- -X- O O\n\nEU NNP I-NP I-ORG\nrejects\tVBZ   I-VP O\nGerman JJ I-NP I-MISC\n\n\n"
            "Peter NNP I-NP I-PER\nBlackburn NNP I-NP I-PER\n  \n-DOCSTART- -X- O O\n"
            "BRUSSELS NNP I-NP I-LOC\nGerman JJ I-NP B-LOC\n")
    ds, skipped, _ = read(write(tmp_path / "eng.train", text), scheme="iob1")
    assert skipped == 0 and ds["tokens"][:] == [["EU", "rejects", "German"], ["Peter", "Blackburn"],
                                                   ["BRUSSELS", "German"]]
    assert ds["tags"][:] == [["B-ORG", "O", "B-MISC"], ["B-PER", "I-PER"], ["B-LOC", "B-LOC"]]
    assert ds["_row"][:] == [3, 8, 12]  # the line that starts each sentence
    packed = tmp_path / "eng.train.gz"
    packed.write_bytes(gzip.compress(text.encode()))
    assert read(packed, scheme="iob1")[0]["tags"][:] == ds["tags"][:]


def test_configurable_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "t.conll", "B-PER\tJohn\tx\nI-PER\tSmith\tx\nO\truns\tx\n")
    ds, _, _ = read(path, token_column=1, tag_column=0)
    assert ds["tokens"][:] == [["John", "Smith", "runs"]] and ds["tags"][:] == [["B-PER", "I-PER", "O"]]
    assert "task.tag_column=5" in str(read_error(path, tag_column=5))
    assert "same column" in str(read_error(path, token_column=0, tag_column=-3))


@pytest.mark.parametrize("scheme, tags, bio", [
    ("iob1", ["I-PER", "I-PER", "B-PER", "O", "I-LOC", "I-ORG"], ["B-PER", "I-PER", "B-PER", "O", "B-LOC", "B-ORG"]),
    ("bio", ["B-PER", "I-PER", "B-PER", "O", "B-LOC", "B-ORG"], ["B-PER", "I-PER", "B-PER", "O", "B-LOC", "B-ORG"]),
    ("bioes", ["B-PER", "E-PER", "S-PER", "O", "B-LOC", "I-LOC", "E-LOC"],
     ["B-PER", "I-PER", "B-PER", "O", "B-LOC", "I-LOC", "I-LOC"]),
])
def test_schemes_convert_to_bio(scheme: str, tags: list[str], bio: list[str], tmp_path: Path) -> None:
    assert to_bio(tags, scheme) == bio
    path = write(tmp_path / "t.jsonl", json.dumps({"tokens": [f"w{i}" for i in range(len(tags))], "tags": tags}))
    ds, _, _ = read(path, scheme=scheme)
    assert ds["tags"][:] == [bio]


@pytest.mark.parametrize("scheme, tags, at, words", [
    ("bio", ["B-PER", "I-LOC"], 1, "type changes"),
    ("bio", ["O", "I-PER"], 1, "tag_scheme=iob1"),
    ("bio", ["B-PER", "E-PER"], 1, "tag_scheme=bioes"),
    ("iob1", ["B-PER", "X-PER"], 1, "invalid tag 'X-PER'"),
    ("bioes", ["B-PER", "O"], 1, "continues with I-PER or E-PER"),
    ("bioes", ["O", "B-PER"], 1, "ends with E-PER"),
    ("bioes", ["O", "E-PER"], 1, "without B-PER"),
])
def test_bad_tag_sequences(scheme: str, tags: list[str], at: int, words: str) -> None:
    with pytest.raises(TagError) as info:
        to_bio(tags, scheme)
    assert info.value.index == at and words in str(info.value)


def test_jsonl_reader_with_other_field_names(tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", '{"words": ["Ann", "sings"], "ner": ["B-PER", "O"]}\n\n'
                                       '{"words": ["Bo"], "ner": ["B-PER"]}\n')
    ds, _, _ = read(path, tokens_field="words", tags_field="ner")
    assert ds["tokens"][:] == [["Ann", "sings"], ["Bo"]] and ds["_row"][:] == [1, 3]
    err = read_error(path)
    assert err.field == "tokens" and "'words'" in str(err) and "t.jsonl" in str(err)


# ---- bad input names file and line ---------------------------------------------------------------
CONLL_GOOD = "Ann B-PER\nsings O\n\n"


@pytest.mark.parametrize("body, line, words", [
    ("Bob B-PER\nruns\n", 9, "1 column(s) where line 1 has 2"),  # the tag is missing: tokens/tags mismatch
    ("Bob B-PER\nruns Q-PER\n", 9, "invalid tag 'Q-PER'"),
    ("Bob B-PER\nSmith I-LOC\n", 9, "type changes without B-LOC"),
    ("Bob O\nSmith I-PER\n", 9, "starts an entity without B-PER"),
])
def test_bad_conll_lines_name_file_and_line(tmp_path: Path, body: str, line: int, words: str) -> None:
    err = read_error(write(tmp_path / "bad.conll", CONLL_GOOD + "\n" + CONLL_GOOD + body))
    assert err.row == line and err.unit == "line" and words in str(err)
    assert f"bad.conll, line {line}:" in str(err) and "1 bad sentence" in str(err)


@pytest.mark.parametrize("record, field, words", [
    ({"tokens": ["a", "b"], "tags": ["O"]}, "tags", "2 tokens but 1 tags"),
    ({"tokens": [], "tags": []}, "tokens", "empty sentence"),
    ({"tokens": ["a", " "], "tags": ["O", "O"]}, "tokens", "token 1 is empty"),
    ({"tokens": ["a", "b"], "tags": ["O", "B-PERSON-"]}, "tags", None),
    ({"tokens": ["a", "b"], "tags": ["B-PER", "I-ORG"]}, "tags", "type changes"),
    ({"tokens": ["a"], "tags": ["B"]}, "tags", "invalid tag 'B'"),
])
def test_bad_jsonl_records_name_file_line_and_field(tmp_path: Path, record: dict, field: str, words) -> None:
    good = json.dumps({"tokens": ["x"], "tags": ["B-PER"]})
    path = write(tmp_path / "bad.jsonl", f"{good}\n{good}\n{json.dumps(record)}\n")
    if words is None:  # B-PERSON- is a valid tag of type "PERSON-"
        assert read(path)[0]["tags"][:][2] == ["O", "B-PERSON-"]
        return
    err = read_error(path)
    assert (err.row, err.unit, err.field) == (3, "line", field) and words in str(err)
    assert str(err).startswith(f"{path}, line 3, field '{field}':")


def test_unknown_type_in_test_file_and_skip_policy(tmp_path: Path) -> None:
    train = write_conll(tmp_path / "train.conll", synthetic(20, seed=1))
    test = write(tmp_path / "test.conll", "Ann B-PER\n\nParis B-GPE\nis O\n\nBo B-PER\n")
    cfg = {"data": {"train": str(train), "test": str(test), "validation_size": 0.2}}
    with pytest.raises(DataError) as info:
        task(cfg).load_splits(seed=0)
    assert "test.conll, line 3" in str(info.value) and "'GPE' does not occur in the training data" in str(info.value)
    cfg["data"]["on_bad_rows"] = "skip"
    splits, report = task(cfg).load_splits(seed=0)
    assert report["skipped_rows"]["test"] == 1 and len(splits["test"]) == 2
    assert report["labels"] == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    assert report["rows"] == {"test": 2, "validation": 4, "train": 16}
    assert any("line 3" in m for m in report["skipped_examples"])


def test_split_by_document_keeps_documents_whole(tmp_path: Path) -> None:
    docs = ["".join(f"w{d}x{i} B-PER\nsays O\n\n" for i in range(d + 2)) for d in range(4)]
    train = write(tmp_path / "train.conll", "".join(f"-DOCSTART- -X- O\n\n{doc}" for doc in docs))
    cfg = {"data": {"train": str(train), "validation_size": 1, "test_size": 0, "split_by": "document"}}
    splits, report = task(cfg).load_splits(seed=0)
    held_out = set(splits["validation"]["document"][:])
    assert len(held_out) == 1 and not held_out & set(splits["train"]["document"][:])
    assert len(splits["validation"]) == next(iter(held_out)) + 1  # document d holds d + 2 sentences
    assert report["groups"]["validation"] == sorted(held_out) and len(report["groups"]["train"]) == 3
    cfg["data"]["split_by"] = "title"
    with pytest.raises(DataError, match="only be grouped by 'document'"):
        task(cfg).load_splits(seed=0)


def test_wrong_tag_column_and_empty_files(tmp_path: Path) -> None:
    path = write(tmp_path / "t.conll", "EU NNP I-ORG\nsays VBZ O\n")
    err = read_error(path, tag_column=1)
    assert err.row == 1 and "invalid tag 'NNP'" in str(err) and "tag_column" in str(err)
    assert "no sentences" in str(read_error(write(tmp_path / "e.conll", "-DOCSTART- -X- O\n\n\n")))
    assert "not found" in str(read_error(tmp_path / "missing.conll"))


# ---- alignment and windows -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def encode(tokenizer, sentences, max_length: int = 64, **options):
    import datasets

    ner = task({"task": {"name": "ner", **options}}, labels=["O", "B-LOC", "I-LOC", "B-PER", "I-PER"])
    ds = datasets.Dataset.from_dict({"tokens": [s[0] for s in sentences], "tags": [s[1] for s in sentences]})
    return ner, ner.encode(ds, tokenizer, max_length)


@pytest.mark.parametrize("all_subtokens, expected", [
    (False, [-100, 3, -100, 0, 1, -100, -100, -100]),
    (True, [-100, 3, 4, 0, 1, 2, 2, -100]),
])
def test_first_subtoken_alignment(tokenizer, all_subtokens: bool, expected: list[int]) -> None:
    # doctors -> doctor ##s; pain-day -> pain - day
    sentence = (["doctors", "in", "pain-day"], ["B-PER", "O", "B-LOC"])
    assert tokenizer.tokenize("doctors pain-day") == ["doctor", "##s", "pain", "-", "day"]
    _, features = encode(tokenizer, [sentence], label_all_subtokens=all_subtokens)
    assert features["labels"][:] == [expected]
    assert features["word_ids"][:] == [[-1, 0, 0, 1, 2, 2, 2, -1]]


def test_byte_level_tokenizers_see_each_word_with_its_space() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = ["John Smith lives here", "the doctor lives in the city", "Smith and John were here"] * 20
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, initial_alphabet=
                                                            pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="Ġ")
    sentence = (["John", "Smith", "lives", "here"], ["B-PER", "I-PER", "O", "O"])
    _, features = encode(tokenizer, [sentence])
    tokens = tokenizer.convert_ids_to_tokens(features["input_ids"][0])
    assert tokens == tokenizer.tokenize(" John Smith lives here")  # as in running text, not "lives" alone
    assert [t.startswith("Ġ") for t in tokens] == [True] * len(tokens)
    assert features["labels"][0][0] == 3 and len(features["word_ids"][0]) == len(tokens)
    # " 1996" is a lone space token and digits: the word's tag sits on its first digit, the space belongs to none
    _, features = encode(tokenizer, [(["John", "1996"], ["B-PER", "B-LOC"])])
    tokens = tokenizer.convert_ids_to_tokens(features["input_ids"][0])
    assert tokens[tokens.index("Ġ")] == "Ġ" and features["word_ids"][0][tokens.index("Ġ")] == -1
    assert features["labels"][0][tokens.index("Ġ") + 1] == 1 and tokens[tokens.index("Ġ") + 1] == "1"


def test_plan_windows_cover_every_word_once() -> None:
    sizes = [3, 1, 1, 2, 5, 1, 1, 1, 2, 1, 1, 9, 1]
    windows = plan_windows(sizes, budget=6, stride=2)
    assert windows[0][0] == 0 and windows[-1][1] == len(sizes)
    assert all(b - a == 1 or sum(sizes[a:b]) <= 6 for a, b in windows)  # the 9-sub-token word stands alone
    owned = owned_ranges(windows)
    assert [w for lo, hi in owned for w in range(lo, hi)] == list(range(len(sizes)))
    assert all(a <= lo < hi <= b for (a, b), (lo, hi) in zip(windows, owned))


def fake_outputs(features, tags_per_sentence, labels, batch_size: int = 3, wrong_outside: bool = False):
    """Model outputs whose logits spell the given word tags; with wrong_outside, a window says O for the words
    it does not own (so only the owners' answers can score)."""
    rows = list(range(len(features)))
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        width = max(len(features[r]["input_ids"]) for r in batch)
        logits = torch.zeros(len(batch), width, len(labels))
        for b, r in enumerate(batch):
            tags = tags_per_sentence[features[r]["sentence"]]
            row = features[r]
            for pos, w in enumerate(row["word_ids"]):
                if w >= 0:
                    owned = row["own_start"] <= w < row["own_end"]
                    logits[b, pos, labels.index(tags[w] if owned or not wrong_outside else "O")] = 5.0
        yield batch, SimpleNamespace(logits=logits, loss=None), {}


def test_long_sentence_windows_merge_back_without_dropping_words(tokenizer) -> None:
    words = [random.Random(i).choice(["doctors", "night", "the", "pain-day", "people"]) for i in range(150)]
    tags = [["B-PER", "I-PER"][i % 2] for i in range(150)]
    short = (["the", "night"], ["O", "B-LOC"])
    ner, features = encode(tokenizer, [short, (words, tags), short], max_length=16, stride=4)
    assert len(features) > 20 and max(features["length"][:]) <= 16
    assert features["sentence"][:].count(1) == len(features) - 2
    outputs = fake_outputs(features, [short[1], tags, short[1]], ner.labels, wrong_outside=True)
    scalars, details = ner.evaluate(outputs, features)
    assert details["words"] == 154 and details["sentences"] == 3
    assert scalars["f1"] == 1.0 and scalars["token_accuracy"] == 1.0
    shifted = tags[1:] + ["O"]  # a prediction one word off is caught at word level
    scalars, _ = ner.evaluate(fake_outputs(features, [short[1], shifted, short[1]], ner.labels), features)
    assert scalars["f1"] < 0.05
    with pytest.raises(ValueError, match="stride"):
        encode(tokenizer, [short], max_length=16, stride=7)


# ---- metrics -------------------------------------------------------------------------------------
def test_metrics_match_hand_computed_seqeval(tokenizer) -> None:
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-LOC", "I-LOC", "O", "B-PER"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["O", "I-LOC", "I-LOC", "O", "B-LOC"]]
    words = [["doctors", "people", "the", "night"], ["a", "day", "week", "the", "actor"]]
    ner, features = encode(tokenizer, list(zip(words, gold)))
    scalars, details = ner.evaluate(fake_outputs(features, pred, ner.labels), features)
    # Default (conlleval) mode: I-LOC after O starts an entity, so 2 of 3 predicted entities are right out of 4.
    assert scalars["precision"] == pytest.approx(2 / 3) and scalars["recall"] == pytest.approx(2 / 4)
    assert scalars["f1"] == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))
    assert scalars["token_accuracy"] == pytest.approx(6 / 9)
    assert details["per_type"]["PER"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert details["per_type"]["LOC"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    # The worst sentences first (the report's mistakes): what was missed and what was found wrongly, as words.
    import datasets

    examples = datasets.Dataset.from_dict({"tokens": words})
    _, details = ner.evaluate(fake_outputs(features, pred, ner.labels), features, examples)
    assert [(m["row"], m["missed"], m["spurious"]) for m in details["mistakes"]] == [
        (1, [{"type": "PER", "text": "actor", "start": 4, "end": 5}], [{"type": "LOC", "text": "actor", "start": 4,
                                                                         "end": 5}]),
        (0, [{"type": "LOC", "text": "night", "start": 3, "end": 4}], [])]
    ner, features = encode(tokenizer, list(zip(words, gold)), strict=True)
    scalars, details = ner.evaluate(fake_outputs(features, pred, ner.labels), features)
    # Strict mode: the entity starting with I-LOC does not count.
    assert scalars["precision"] == pytest.approx(1 / 2) and scalars["recall"] == pytest.approx(1 / 4)
    assert details["mode"] == "strict"


def test_evaluation_loss_is_the_mean_over_tagged_words(tokenizer) -> None:
    """Each batch's loss is a mean over its tagged words; batches of different sizes weigh by those words."""
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-LOC", "I-LOC", "O", "B-PER"]]
    words = [["doctors", "people", "the", "night"], ["a", "day", "week", "the", "actor"]]
    ner, features = encode(tokenizer, list(zip(words, gold)))
    outputs = [(b, out, {}) for b, out, _ in fake_outputs(features, gold, ner.labels, batch_size=1)]
    for (_, out, batch), tagged, loss in zip(outputs, (4, 5), (1.0, 2.0)):
        out.loss = torch.tensor(loss)
        batch["labels"] = torch.tensor([[-100] + [0] * tagged + [-100] * 3])
    scalars, _ = ner.evaluate(iter(outputs), features)
    assert scalars["loss"] == pytest.approx((4 * 1.0 + 5 * 2.0) / 9)


# ---- training, prediction, pipeline --------------------------------------------------------------
@pytest.fixture(scope="module")
def ner_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ner-data")
    return {"train": write_conll(root / "train.conll", synthetic(240, seed=1)),
            "test": write_conll(root / "test.conll", synthetic(40, seed=2)), "root": root}


def ner_config(tiny_model_dir: Path, files: dict[str, Path], name: str, **train) -> dict:
    return {"model": {"name": str(tiny_model_dir)},
            "data": {"train": str(files["train"]), "test": str(files["test"]), "validation_size": 0.2},
            "task": {"name": "ner", "stride": 8},
            "train": {"epochs": 6, "batch_size": 16, "lr": 5e-3, "warmup_ratio": 0.0, "log_every": 4, "seed": 3,
                      **train},
            "output": {"dir": str(files["root"] / "runs"), "name": name}}


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, ner_files: dict) -> lmtune.RunResult:
    return lmtune.train(ner_config(tiny_model_dir, ner_files, "ner"))


def test_training_learns_entities(trained) -> None:
    records = [json.loads(line) for line in (trained.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert losses[-1] < 0.3 * losses[0], losses
    m = trained.metrics
    assert m["test"]["f1"] >= 0.9 and m["selection"]["metric"] == "f1"
    assert set(m["test"]["per_type"]) == {"LOC", "PER"} and m["test"]["words"] == m["data"]["tokens"]["test"]
    assert m["data"]["entities"]["test"]["PER"] + m["data"]["entities"]["test"]["LOC"] == sum(
        t["support"] for t in m["test"]["per_type"].values())
    saved = json.loads((trained.run_dir / "metrics.json").read_text())
    assert saved["test"]["per_type"]["PER"]["support"] > 0


TEXT = "The  doctor people met,in the night   week (day)! Actor's  day"


@pytest.mark.parametrize("text, words", [
    ("नरेंद्र मोदी ने कहा", ["नरेंद्र", "मोदी", "ने", "कहा"]),  # vowel signs and viramas stay in their word
    ("Cafe\u0301 in U.S.", ["Cafe\u0301", "in", "U.S."]),  # a decomposed é
    ("محمد عَلي", ["محمد", "عَلي"]),
    ("李明在北京工作。", ["李", "明", "在", "北", "京", "工", "作", "。"]),  # no spaces: one word per character
    ("H₂O at 10 m²", ["H₂O", "at", "10", "m²"]),  # sub- and superscript digits stay in their word
])
def test_raw_text_words_in_other_scripts(text: str, words: list[str]) -> None:
    found, spans = split_words(text)
    assert found == words and all(text[a:b] == w for w, (a, b) in zip(found, spans))


def test_predict_spans_with_character_offsets(trained) -> None:
    words, spans = split_words(TEXT)
    assert words == ["The", "doctor", "people", "met", ",", "in", "the", "night", "week", "(", "day", ")", "!",
                     "Actor", "'s", "day"]
    assert all(TEXT[a:b] == w for w, (a, b) in zip(words, spans))
    predictor = lmtune.load(trained.run_dir)
    out = predictor.predict([TEXT, {"tokens": ["a", "night", "week", "doctor"]},
                             {"tokens": ["an", "actor"], "text": "an   actor!"}])
    found = [(e["type"], e["text"]) for e in out[0]["entities"]]
    assert found == [("PER", "doctor people"), ("LOC", "night   week"), ("LOC", "day"), ("PER", "Actor"),
                     ("LOC", "day")]
    for e in out[0]["entities"]:
        assert TEXT[e["start"]:e["end"]] == e["text"] and 0 < e["score"] <= 1
    assert out[0]["entities"][1]["start"] == TEXT.index("night")
    assert [(e["type"], e["start"], e["end"], e["text"]) for e in out[1]["entities"]] == [
        ("LOC", 2, 12, "night week"), ("PER", 13, 19, "doctor")]
    assert [(e["start"], e["end"]) for e in out[2]["entities"]] == [(5, 10)]
    with pytest.raises(DataError, match="empty or missing text"):
        predictor.predict(["   "])
    with pytest.raises(DataError, match=r"input, row 2, field 'text': no `text` field \(fields found: sentence\)"):
        predictor.predict(["fine", {"sentence": "the column of another file"}])


def test_pipeline_and_eval_agree_with_predict(trained) -> None:
    from transformers import pipeline

    tagger = pipeline("token-classification", model=str(trained.run_dir / "model"), aggregation_strategy="first",
                      device="cpu")
    text = "The doctor people met, in the  night week (day)!"
    groups = tagger(text)
    ours = lmtune.load(trained.run_dir).predict([text])[0]["entities"]
    assert len(ours) == 3
    assert [(g["entity_group"], g["start"], g["end"]) for g in groups] == [
        (e["type"], e["start"], e["end"]) for e in ours]
    test_file = load_config(trained.run_dir / "config.yaml").data.test
    metrics = lmtune.evaluate(trained.run_dir, test_file)
    assert metrics["f1"] == pytest.approx(trained.metrics["test"]["f1"]) and metrics["rows"] == 40


# ---- examples and real data ----------------------------------------------------------------------
def test_example_config_is_valid() -> None:
    cfg = load_config(Path(__file__).parents[2] / "examples" / "conll2003.yaml")
    assert cfg.task.name == "ner" and cfg.task.tag_scheme == "iob1"
    assert cfg.data.train.endswith("conll2003/eng.train") and cfg.data.validation.endswith("eng.testa")


@pytest.mark.skipif(not (SHARED_DATA / "conll2003" / "eng.train").is_file(), reason="needs ../shared/data/conll2003")
def test_reads_conll2003_with_published_counts() -> None:
    ds, skipped, _ = read(SHARED_DATA / "conll2003" / "eng.train", scheme="iob1")
    tags = [t for sentence in ds["tags"][:] for t in sentence]
    assert skipped == 0 and len(ds) == 14041 and len(tags) == 203621
    counts = {kind: tags.count(f"B-{kind}") for kind in ("PER", "LOC", "ORG", "MISC")}
    assert counts == {"PER": 6600, "LOC": 7140, "ORG": 6321, "MISC": 3438}


def test_cli_predict_mixes_raw_and_pretokenized_rows(trained, tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from lmtune.cli import app
    from lmtune.predict import Predictor

    seen: list = []
    predict = Predictor.predict
    monkeypatch.setattr(Predictor, "predict", lambda self, records: seen.extend(records) or predict(self, records))
    inputs = write(tmp_path / "in.jsonl", '{"id": 1, "tokens": ["the", "doctor", "people"]}\n'
                                          '{"id": 2, "text": "In the  night, week!"}\n'
                                          '{"id": 3, "tokens": ["night", "-", "week"], "text": "night-week"}\n')
    result = CliRunner().invoke(app, ["predict", str(trained.run_dir), "-i", str(inputs), "-o", "-"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [(e["type"], e["text"]) for e in rows[0]["entities"]] == [("PER", "doctor people")]
    assert [(e["type"], e["start"], e["end"]) for e in rows[1]["entities"]] == [("LOC", 8, 13), ("LOC", 15, 19)]
    assert seen[2]["tokens"] == ["night", "-", "week"]  # given tokens beside the text are the words (not re-split)


@pytest.mark.parametrize("strict", [False, True])
def test_entity_scores_equal_seqeval_report(strict: bool) -> None:
    """One read of each side's entities gives seqeval's classification_report, messy tag sequences included
    (I- without B-, type switches inside a chunk, empty sentences, a type never predicted or never true)."""
    from seqeval.metrics import classification_report
    from seqeval.scheme import IOB2

    rng = random.Random(3)
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "I-MISC"]
    y_true = [[rng.choice(tags[:7]) for _ in range(rng.randint(0, 12))] for _ in range(300)]
    y_pred = [[t if rng.random() < 0.7 else rng.choice(tags + ["B-MISC"]) for t in row] for row in y_true]
    micro, per_type = entity_scores(y_true, y_pred, ["LOC", "MISC", "ORG", "PER"], strict)
    mode = {"mode": "strict", "scheme": IOB2} if strict else {}
    report = classification_report(y_true, y_pred, output_dict=True, zero_division=0, **mode)
    expected = report["micro avg"]
    assert micro == pytest.approx({"precision": expected["precision"], "recall": expected["recall"],
                                   "f1": expected["f1-score"], "support": expected["support"]})
    for kind, row in per_type.items():
        ref = report.get(kind, {"precision": 0.0, "recall": 0.0, "f1-score": 0.0, "support": 0})
        assert row == pytest.approx({"precision": ref["precision"], "recall": ref["recall"],
                                     "f1": ref["f1-score"], "support": ref["support"]}), kind
    assert 0 < micro["f1"] < 1 and per_type["MISC"]["support"] == 0 and per_type["MISC"]["precision"] == 0
    # Nothing to find and nothing found: all zero (seqeval's zero_division=0), not an error.
    assert entity_scores([["O"], []], [["O"], []], [], strict)[0] == {"precision": 0, "recall": 0, "f1": 0,
                                                                      "support": 0}
    with pytest.raises(ValueError, match="length"):
        entity_scores([["O", "O"]], [["O"]], ["PER"], strict)
