"""Baseline: plain Hugging Face Trainer extractive QA, written the way the official run_qa.py example does it.

Standard windowing (prepare_train_features / prepare_validation_features: max_length windows with
doc_stride overlap, padded to max_length, default_data_collator), the Trainer with TrainingArguments
defaults (bf16 on a GPU that supports it), and utils_qa's postprocess_qa_predictions (n-best start/end
logits over every window, max answer length, offsets back to the context). EM/F1 with the official
SQuAD formula (lmtune.evaluation.squad). Needs only torch, transformers, accelerate, datasets (+ numpy).

    python benchmarks/qa_trainer_baseline.py --model MODEL_DIR --data dev-v1.1.json.gz \
        --split examples/squad_split.json --out /tmp/trainer_qa.json

--split is a JSON file with "train" and "test" lists of article titles (benchmarks/qa_compare.py writes
the ones lmtune trained and tested on, so both train on the same questions).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # lmtune.evaluation.squad, if not installed


def read_squad(path: str, titles: set[str]) -> dict[str, list]:
    """The questions of the given articles of a SQuAD JSON file, flattened as the `squad` dataset has them."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        data = json.load(f)["data"]
    rows: dict[str, list] = {"id": [], "title": [], "context": [], "question": [], "answers": []}
    for article in data:
        if article["title"] not in titles:
            continue
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                rows["id"].append(qa["id"])
                rows["title"].append(article["title"])
                rows["context"].append(paragraph["context"])
                rows["question"].append(qa["question"])
                rows["answers"].append({"text": [a["text"] for a in qa["answers"]],
                                        "answer_start": [a["answer_start"] for a in qa["answers"]]})
    return rows


def prepare_train_features(examples, tokenizer, max_length: int, doc_stride: int):
    pad_on_right = tokenizer.padding_side == "right"
    # Some questions have lots of whitespace on the left, which would eat into the context's room.
    examples["question"] = [q.lstrip() for q in examples["question"]]
    tokenized = tokenizer(
        examples["question" if pad_on_right else "context"],
        examples["context" if pad_on_right else "question"],
        truncation="only_second" if pad_on_right else "only_first",
        max_length=max_length, stride=doc_stride, return_overflowing_tokens=True,
        return_offsets_mapping=True, padding="max_length")
    sample_mapping = tokenized.pop("overflow_to_sample_mapping")
    offset_mapping = tokenized.pop("offset_mapping")
    tokenized["start_positions"], tokenized["end_positions"] = [], []
    for i, offsets in enumerate(offset_mapping):
        input_ids = tokenized["input_ids"][i]
        cls_index = input_ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in input_ids else 0
        sequence_ids = tokenized.sequence_ids(i)
        answers = examples["answers"][sample_mapping[i]]
        if len(answers["answer_start"]) == 0:
            tokenized["start_positions"].append(cls_index)
            tokenized["end_positions"].append(cls_index)
            continue
        start_char = answers["answer_start"][0]
        end_char = start_char + len(answers["text"][0])
        token_start = 0
        while sequence_ids[token_start] != (1 if pad_on_right else 0):
            token_start += 1
        token_end = len(input_ids) - 1
        while sequence_ids[token_end] != (1 if pad_on_right else 0):
            token_end -= 1
        if not (offsets[token_start][0] <= start_char and offsets[token_end][1] >= end_char):
            tokenized["start_positions"].append(cls_index)  # the answer is not in this window
            tokenized["end_positions"].append(cls_index)
            continue
        while token_start < len(offsets) and offsets[token_start][0] <= start_char:
            token_start += 1
        tokenized["start_positions"].append(token_start - 1)
        while offsets[token_end][1] >= end_char:
            token_end -= 1
        tokenized["end_positions"].append(token_end + 1)
    return tokenized


def prepare_validation_features(examples, tokenizer, max_length: int, doc_stride: int):
    pad_on_right = tokenizer.padding_side == "right"
    examples["question"] = [q.lstrip() for q in examples["question"]]
    tokenized = tokenizer(
        examples["question" if pad_on_right else "context"],
        examples["context" if pad_on_right else "question"],
        truncation="only_second" if pad_on_right else "only_first",
        max_length=max_length, stride=doc_stride, return_overflowing_tokens=True,
        return_offsets_mapping=True, padding="max_length")
    sample_mapping = tokenized.pop("overflow_to_sample_mapping")
    tokenized["example_id"] = []
    for i in range(len(tokenized["input_ids"])):
        sequence_ids = tokenized.sequence_ids(i)
        context_index = 1 if pad_on_right else 0
        tokenized["example_id"].append(examples["id"][sample_mapping[i]])
        # None marks the tokens that are not part of the context, so post-processing can skip them.
        tokenized["offset_mapping"][i] = [o if sequence_ids[k] == context_index else None
                                          for k, o in enumerate(tokenized["offset_mapping"][i])]
    return tokenized


def postprocess_qa_predictions(examples, features, start_logits_all, end_logits_all, n_best_size: int = 20,
                               max_answer_length: int = 30) -> dict[str, str]:
    """utils_qa.postprocess_qa_predictions for SQuAD v1 (no null answer): the best span over all windows."""
    example_index = {k: i for i, k in enumerate(examples["id"])}
    features_per_example = collections.defaultdict(list)
    for i, example_id in enumerate(features["example_id"]):
        features_per_example[example_index[example_id]].append(i)
    offset_mappings = features["offset_mapping"]
    predictions = {}
    for index, example_id in enumerate(examples["id"]):
        context = examples["context"][index]
        candidates = []
        for feature_index in features_per_example[index]:
            start_logits, end_logits = start_logits_all[feature_index], end_logits_all[feature_index]
            offsets = offset_mappings[feature_index]
            start_indexes = np.argsort(start_logits)[-1:-n_best_size - 1:-1].tolist()
            end_indexes = np.argsort(end_logits)[-1:-n_best_size - 1:-1].tolist()
            for s in start_indexes:
                for e in end_indexes:
                    if s >= len(offsets) or e >= len(offsets) or offsets[s] is None or offsets[e] is None \
                            or len(offsets[s]) < 2 or len(offsets[e]) < 2:
                        continue
                    if e < s or e - s + 1 > max_answer_length:
                        continue
                    candidates.append((start_logits[s] + end_logits[e], offsets[s][0], offsets[e][1]))
        best = max(candidates) if candidates else None
        predictions[example_id] = context[best[1]:best[2]] if best else ""
    return predictions


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local model folder")
    parser.add_argument("--data", required=True, help="SQuAD v1.1 JSON (optionally .gz)")
    parser.add_argument("--split", required=True, help="JSON with 'train' and 'test' lists of article titles")
    parser.add_argument("--out", default=None, help="write the results here (JSON)")
    parser.add_argument("--output-dir", default="/tmp/qa_trainer_baseline")
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--doc-stride", type=int, default=128)
    parser.add_argument("--n-best", type=int, default=20)
    parser.add_argument("--max-answer-length", type=int, default=30)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max-steps", type=int, default=-1, help="smoke tests only")
    parser.add_argument("--max-train-samples", type=int, default=None, help="smoke tests only")
    parser.add_argument("--max-eval-samples", type=int, default=None, help="smoke tests only")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import datasets
    from transformers import (AutoModelForQuestionAnswering, AutoTokenizer, Trainer, TrainingArguments,
                              default_data_collator, set_seed)

    from lmtune.evaluation.squad import squad_metrics

    started = time.perf_counter()
    set_seed(args.seed)
    split = json.loads(Path(args.split).read_text(encoding="utf-8"))
    train_examples = datasets.Dataset.from_dict(read_squad(args.data, set(split["train"])))
    test_examples = datasets.Dataset.from_dict(read_squad(args.data, set(split["test"])))
    if args.max_train_samples:
        train_examples = train_examples.shuffle(seed=args.seed).select(range(args.max_train_samples))
    if args.max_eval_samples:
        test_examples = test_examples.select(range(args.max_eval_samples))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    # The weights may be a half-precision copy: train fp32 master weights, with bf16 autocast on the GPU.
    model = AutoModelForQuestionAnswering.from_pretrained(args.model, dtype=torch.float32)
    features = dict(tokenizer=tokenizer, max_length=args.max_length, doc_stride=args.doc_stride)
    train_features = train_examples.map(prepare_train_features, batched=True, fn_kwargs=features,
                                        remove_columns=train_examples.column_names)
    test_features = test_examples.map(prepare_validation_features, batched=True, fn_kwargs=features,
                                      remove_columns=test_examples.column_names)
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    training_args = TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size * 2, learning_rate=args.lr, num_train_epochs=args.epochs,
        max_steps=args.max_steps, bf16=bf16, seed=args.seed, save_strategy="no", report_to="none",
        logging_steps=100, disable_tqdm=True)
    trainer = Trainer(model=model, args=training_args, train_dataset=train_features,
                      data_collator=default_data_collator, processing_class=tokenizer)
    train_result = trainer.train()
    model_inputs = test_features.remove_columns(["example_id", "offset_mapping"])
    eval_started = time.perf_counter()
    start_logits, end_logits = trainer.predict(model_inputs).predictions[:2]
    predictions = postprocess_qa_predictions(test_examples, test_features, start_logits, end_logits,
                                             args.n_best, args.max_answer_length)
    golds = [a["text"] for a in test_examples["answers"]]
    metrics = squad_metrics([predictions[i] for i in test_examples["id"]], golds)
    result = {"system": "hf_trainer", "exact_match": round(metrics["exact_match"], 2), "f1": round(metrics["f1"], 2),
              "test_questions": len(test_examples), "test_windows": len(test_features),
              "train_questions": len(train_examples), "train_windows": len(train_features),
              "steps": train_result.global_step, "train_seconds": round(train_result.metrics["train_runtime"], 2),
              "eval_seconds": round(time.perf_counter() - eval_started, 2),
              "wall_seconds": round(time.perf_counter() - started, 2), "bf16": bf16,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
