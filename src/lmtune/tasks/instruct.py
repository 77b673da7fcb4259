"""Instruction tuning: chat messages formatted with the chat template, loss on the assistant's tokens."""

from __future__ import annotations

import logging
import string
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal

from lmtune.data import DataError, apply_row_checks, read_table, resolve_path
from lmtune.data.labels import label_map_problem, label_renames, label_text
from lmtune.data.text import read_documents
from lmtune.registry import register_task
import lmtune.tasks.lm_common as lm_common
from lmtune.tasks.lm_common import DecoderOptions

if TYPE_CHECKING:
    from lmtune.config import DataConfig

log = logging.getLogger("lmtune")

ROLES = ("system", "user", "assistant")
# For tokenizers without a chat template: role tags and EOS after every turn, so a tuned model stops.
DEFAULT_TEMPLATE = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + "
                    "eos_token + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")


class InstructOptions(DecoderOptions):
    name: Literal["instruct"] = "instruct"
    """Instruction tuning of a decoder on chat messages or instruction/input/output rows."""
    loss_on: Literal["assistant", "all"] = "assistant"
    """Tokens that carry the loss: the assistant replies (with their end-of-turn token) or the whole chat."""
    too_long: Literal["truncate", "drop"] = "truncate"
    """Examples longer than model.max_length: cut at the limit, or left out (counted in the data report)."""
    prompt_template: str | None = None
    """Build chats from a table: the user turn is this template filled from the row's columns (e.g.
    "Review: {sentence}\\nSentiment:"; CSV/TSV values are text as written), the assistant reply is
    data.label_column renamed by data.label_map."""
    answer_choices: list[str] | None = None
    """Score generations as a choice among these answers (the first one named), not by exact match."""
    eval_generate: bool = False
    """Also generate for the test split before and after training and score the generations."""
    packing: bool = False
    """Pack several conversations into one row of model.max_length tokens, each attending only to itself (position
    ids restart per conversation: a block-diagonal mask), the loss still on the replies alone: fewer, fuller rows
    for short conversations."""


def _check_messages(messages: Any) -> tuple[str, str] | None:
    """(field, message) for the first problem of a chat, None when it is good."""
    if not isinstance(messages, list) or not messages:
        return "messages", "messages must be a non-empty list of {role, content}"
    for j, turn in enumerate(messages):
        if not isinstance(turn, dict):
            return f"messages[{j}]", f"a turn must be an object with role and content, got {type(turn).__name__}"
        role, content = turn.get("role"), turn.get("content")
        if role is None:
            return f"messages[{j}].role", "missing role"
        if role not in ROLES:
            return f"messages[{j}].role", f"unknown role {role!r} (known: {', '.join(ROLES)})"
        if not isinstance(content, str) or not content.strip():
            return f"messages[{j}].content", "empty content" if content is None or isinstance(content, str) \
                else f"content must be a string, got {type(content).__name__}"
    if not any(t["role"] == "assistant" for t in messages):
        return "messages", "no assistant turn (nothing to learn from)"
    return None


def _split_prompt(messages: list[dict]) -> tuple[list[dict], str | None]:
    """The turns before the last assistant reply, and that reply (None when the chat ends with a prompt)."""
    last = max((i for i, t in enumerate(messages) if t["role"] == "assistant"), default=None)
    if last is None or last != len(messages) - 1:
        return messages, None
    return messages[:last], messages[last]["content"]


@register_task("instruct")
class Instruct(lm_common.DecoderTask):
    Options = InstructOptions

    def __init__(self, options: InstructOptions, data: DataConfig, labels: list[str] | None = None):
        self.options, self.data = options, data
        self.renames = label_renames(data.label_map)  # template rows' labels, by label text
        self.encode_report: dict[str, Any] = {}
        self.seed = 0

    @property
    def generates_on_test(self) -> bool:
        return self.options.eval_generate

    # ---- data ------------------------------------------------------------------------------------
    def _to_messages(self, row: dict, columns: list[str]) -> Any:
        """A row as a chat (list of turns), or a (field, message) problem."""
        opts, cfg = self.options, self.data
        if "messages" in columns:
            return row["messages"]
        if opts.prompt_template:
            fields = [f for _, f, _, _ in string.Formatter().parse(opts.prompt_template) if f]
            for name in fields + [cfg.label_column]:
                value = row.get(name)
                if value is None or (isinstance(value, str) and not value.strip()):
                    return name, "missing value"
            label = label_text(row[cfg.label_column])
            label = self.renames.get(label, label)
            return [{"role": "user", "content": opts.prompt_template.format(**{f: row[f] for f in fields})},
                    {"role": "assistant", "content": str(label)}]
        if "output" not in columns and isinstance(row.get("instances"), list) and row["instances"]:
            first = row["instances"][0]  # self-instruct rows: the first instance's input and output
            if isinstance(first, dict):
                row = {**row, "input": first.get("input"), "output": first.get("output")}
        for name in ("instruction", "output"):
            if not isinstance(row.get(name), str) or not row[name].strip():
                return name, "empty content" if row.get(name) is None or isinstance(row.get(name), str) \
                    else f"must be a string, got {type(row[name]).__name__}"
        extra = row.get("input")
        user = row["instruction"].strip() + (f"\n\n{extra.strip()}" if isinstance(extra, str) and extra.strip() else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]

    def _read(self, path: str, skipped: list[str] | None = None) -> Any:
        ds = read_table(resolve_path(path), self.data.format, on_bad_rows=self.data.on_bad_rows, skipped=skipped)
        columns = ds.column_names
        shapes = ({"messages"}, {"instruction", "output"}, {"instruction", "instances"})  # the last: self-instruct
        if not self.options.prompt_template and not any(shape <= set(columns) for shape in shapes):
            raise DataError(path, f"instruction data needs a `messages` column or `instruction` and `output` "
                                  f"(or self-instruct's `instances`) columns (found: "
                                  f"{', '.join(c for c in columns if c != '_row')}); for a labelled "
                                  "table set task.prompt_template")

        def check(row: dict) -> tuple[str, str] | None:
            chat = self._to_messages(row, columns)
            return chat if isinstance(chat, tuple) else _check_messages(chat)

        ds, messages = apply_row_checks(ds, path, check, self.data.on_bad_rows)
        if self.options.prompt_template and self.data.label_map and path == self.data.train:
            found = {label_text(v) for v in ds[self.data.label_column][:]}
            if problem := label_map_problem(found, self.data.label_map):
                raise DataError(path, problem, field=self.data.label_column)
        if skipped is not None:
            skipped += messages
        return ds.map(lambda row: {"messages": self._to_messages(row, columns), "_row": row["_row"], "_file": path},
                      remove_columns=columns)

    def load_splits(self, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
        cfg = self.data
        splits, train, skipped = lm_common.read_splits(self._read, cfg, seed)
        self.seed = seed
        splits["train"] = self._with_replay(train) if cfg.replay else train
        return splits, {"rows": {k: len(v) for k, v in splits.items()},
                        "skipped_rows": {k: len(v) for k, v in skipped.items()},
                        "skipped_examples": [m for v in skipped.values() for m in v][:20]}

    def _with_replay(self, train: Any) -> Any:
        """Training chats plus every replay document (as `replay_text`); `encode` picks the share to use."""
        import datasets

        docs = read_documents(self.data.replay.path)
        train = train.add_column("replay_text", [None] * len(train)).cast_column("replay_text",
                                                                                datasets.Value("string"))
        replay = datasets.Dataset.from_dict({"messages": [None] * len(docs), "_row": docs["_row"][:],
                                             "_file": [self.data.replay.path] * len(docs),
                                             "replay_text": docs["text"][:]}, features=train.features)
        return datasets.concatenate_datasets([train, replay])

    def load_eval_file(self, path: str) -> Any:
        return self._read(path)

    @staticmethod
    def split_prompt(messages: list[dict]) -> tuple[list[dict], str | None]:
        """A chat's prompt (the turns before its last reply) and that reply (None where it ends on another turn)."""
        return _split_prompt(messages)

    def from_texts(self, records: list[Any]) -> list[list[dict]]:
        """Chats to answer: strings (one user turn), or dicts with `messages`, `instruction`[/`input`], or the
        prompt template's fields; a chat ending with an assistant reply is answered from the turns before it."""
        chats = []
        for i, record in enumerate(records, 1):
            # Rows of one JSONL file share their keys: a key this row lacks comes as None.
            row = {k: v for k, v in record.items() if v is not None} if isinstance(record, dict) else {"text": record}
            if self.options.prompt_template and "messages" not in row:
                fields = [f for _, f, _, _ in string.Formatter().parse(self.options.prompt_template) if f]
                if "text" in row and len(fields) == 1:
                    row = {fields[0]: row["text"]}
                chat = self._to_messages({**row, self.data.label_column: "-"}, list(row))
            elif isinstance(row.get("text"), str) and "messages" not in row and "instruction" not in row:
                chat = [{"role": "user", "content": row["text"]}]
            else:
                chat = self._to_messages({**row, "output": row.get("output", "-")}, list(row))
            if not isinstance(chat, tuple):  # `messages` as given (of any type), or a chat made from the fields
                problem = _check_messages(chat + [{"role": "assistant", "content": "-"}] if isinstance(chat, list)
                                          and chat else chat)
                prompt = None if problem else _split_prompt(chat)[0]
                chat = problem or prompt or ("messages", "nothing to answer: no turn before the chat's last reply")
            if isinstance(chat, tuple):
                raise DataError("input", chat[1], row=i, field=chat[0])
            chats.append(chat)
        return chats

    # ---- features --------------------------------------------------------------------------------
    def _render(self, tokenizer: Any, messages: list[dict], prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt,
                                             chat_template=tokenizer.chat_template or DEFAULT_TEMPLATE)

    def _tokenize(self, tokenizer: Any, messages: list[dict]) -> tuple[list[int], list[int]]:
        """Token ids of a formatted chat and its labels: each assistant reply through its end-of-turn
        text (found by rendering the chat up to the reply, then through it), or every token."""
        text = self._render(tokenizer, messages)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        if self.options.loss_on == "all":
            return ids, list(ids)
        spans = []
        for i, turn in enumerate(messages):
            if turn["role"] != "assistant":
                continue
            start = len(self._render(tokenizer, messages[:i], prompt=True))
            end = len(self._render(tokenizer, messages[:i + 1]))
            if not text.startswith(self._render(tokenizer, messages[:i + 1])):
                raise ValueError("the chat template does not render a chat as a prefix of its continuation; "
                                 "use task.loss_on=all")
            spans.append((start, end))
        labels = [t if any(s <= a < e for s, e in spans) else -100 for t, (a, _) in zip(ids, enc["offset_mapping"])]
        return ids, labels

    def encode(self, ds: Any, tokenizer: Any, max_length: int) -> Any:
        import datasets

        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token: a tuned model would not know where to stop")
        rows: dict[str, list] = {"input_ids": [], "labels": [], "length": []}
        files = ds["_file"][:] if "_file" in ds.column_names else ["input"] * len(ds)
        counts: dict[str, dict[str, int]] = {}
        replay = [t for t in ds["replay_text"][:] if t is not None] if "replay_text" in ds.column_names else []
        for messages, file in zip(ds["messages"][:], files):
            if messages is None:  # a replay document, added below
                continue
            ids, labels = self._tokenize(tokenizer, messages)
            count = counts.setdefault(file, {"examples": 0, "truncated": 0, "dropped": 0})
            count["examples"] += 1
            if len(ids) > max_length:
                if self.options.too_long == "drop" or all(x == -100 for x in labels[1:max_length]):
                    count["dropped"] += 1  # also a truncation that would cut off every target
                    continue
                ids, labels = ids[:max_length], labels[:max_length]
                count["truncated"] += 1
            rows["input_ids"].append(ids)
            rows["labels"].append(labels)
            rows["length"].append(len(ids))
        for file, count in counts.items():
            if count["dropped"] == count["examples"]:
                raise DataError(file, f"every example ({count['examples']}) is longer than model.max_length="
                                      f"{max_length} tokens (task.too_long={self.options.too_long}); raise "
                                      "model.max_length or shorten the examples")
            if count["dropped"] or count["truncated"]:
                log.warning("%s: %d of %d examples longer than %d tokens: %d truncated, %d dropped", file,
                            count["dropped"] + count["truncated"], count["examples"], max_length,
                            count["truncated"], count["dropped"])
        self.encode_report.setdefault("too_long", {}).update(counts)
        if replay:
            self._add_replay(rows, replay, tokenizer, max_length)
        if self.options.packing:
            from lmtune.data.text import pack_whole

            packed = pack_whole(list(zip(rows["input_ids"], rows["labels"])), max_length)
            self.encode_report["packing"] = {"examples": len(rows["input_ids"]), "rows": len(packed)}
            log.info("packing: %d conversations in %d rows (%.1f a row); train.batch_size counts rows, so a step holds "
                     "that many times more conversations and an epoch that many times fewer steps (divide batch_size "
                     "by it to keep the unpacked run's steps)", len(rows["input_ids"]), len(packed),
                     len(rows["input_ids"]) / max(1, len(packed)))
            rows = {key: [r[key] for r in packed] for key in ("input_ids", "labels", "position_ids")}
            rows["length"] = [len(ids) for ids in rows["input_ids"]]
        return datasets.Dataset.from_dict(rows)

    def _add_replay(self, rows: dict[str, list], texts: list[str], tokenizer: Any, max_length: int) -> None:
        """General-text rows (loss on every token) holding data.replay.ratio of the training tokens."""
        task_tokens = sum(rows["length"])
        # Cut to max_length before choosing: the ratio counts the tokens that are actually trained on.
        docs = [d[:max_length] for d in lm_common.tokenize_documents(texts, tokenizer)]
        chosen = [docs[i] for i in lm_common.choose_replay(task_tokens, map(len, docs), self.data.replay.ratio,
                                                            self.seed)]
        for ids in chosen:
            rows["input_ids"].append(ids)
            rows["labels"].append(ids)
            rows["length"].append(len(ids))
        tokens = sum(map(len, chosen))
        self.encode_report["replay"] = {"documents": len(chosen), "tokens": tokens, "task_tokens": task_tokens,
                                        "share": round(tokens / max(1, tokens + task_tokens), 4)}

    def collate(self, tokenizer: Any, pad_to_multiple_of: int, max_width: int | None = None) -> Any:
        return lm_common.collate_rows(tokenizer, pad_to_multiple_of, max_width)

    # ---- outputs ---------------------------------------------------------------------------------
    def evaluate(self, outputs: Iterable, features: Any, examples: Any = None
                 ) -> tuple[dict[str, float], dict[str, Any]]:
        scalars = lm_common.perplexity(outputs)
        return scalars, {"tokens": scalars.pop("tokens")}

    def generate(self, model: Any, tokenizer: Any, inputs: list[list[dict]], device: Any) -> list[dict[str, Any]]:
        prompts = [self._render(tokenizer, chat, prompt=True) for chat in inputs]
        texts = lm_common.generate(model, tokenizer, prompts, self.options, device)
        choices = self.options.answer_choices
        return [{"generated": t, **({"answer": lm_common.pick_choice(t, choices)} if choices else {})} for t in texts]

    def score_generations(self, ds: Any, generate: Callable[[list], list[dict]]) -> dict[str, Any]:
        """Generate for each chat's prompt (the turns before its last reply) and score against that reply."""
        pairs = [_split_prompt(m) for m in ds["messages"][:]]
        pairs = [(p, r) for p, r in pairs if r is not None]
        if not pairs:
            return {}
        generations = [g["generated"] for g in generate([p for p, _ in pairs])]
        scores = lm_common.score_generations(generations, [r for _, r in pairs], self.options.answer_choices)
        scores["samples"] = [{"reference": r, "generated": g} for (_, r), g in zip(pairs[:5], generations)]
        return scores
