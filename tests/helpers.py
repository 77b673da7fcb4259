"""Helpers shared by tests: synthetic sentiment data and paths (imported as `helpers`, never `conftest`)."""

from __future__ import annotations

import csv
import random
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

POSITIVE = "good great excellent amazing wonderful love best helpful perfect".split()
NEGATIVE = "bad awful terrible horrible worst hate poor useless nausea".split()
NEUTRAL = "okay average some maybe sometimes mixed".split()
FILLER = "the film drug was it this really very one time people story".split()


def make_sentiment_rows(n: int, seed: int = 0, classes: int = 2) -> list[dict]:
    """Texts whose label is readable from their words, so a tiny model can learn it in a few steps."""
    rng = random.Random(seed)
    pools = [("positive", POSITIVE), ("negative", NEGATIVE), ("neutral", NEUTRAL)][:classes]
    rows = []
    for i in range(n):
        label, pool = pools[i % classes]
        words = rng.sample(FILLER, rng.randint(2, 6)) + rng.sample(pool, rng.randint(1, 3))
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def make_tiny_decoder(folder: Path, chat_template: str | None = CHATML, tied: bool = True) -> Path:
    """A random 2-layer Llama (hidden 32) with a word-level tokenizer over the committed vocab's words,
    EOS `<eos>` and ChatML turn markers as special tokens; saved as an HF folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = [w for w in (FIXTURES / "vocab.txt").read_text().split() if not w.startswith(("[", "##"))]
    specials = ["<pad>", "<unk>", "<eos>", "<|im_start|>", "<|im_end|>"]
    extra = ["user", "assistant", "system", "positive", "negative", "sentiment", "review", ":", "<", ">", "|"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + extra + words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="<eos>", additional_special_tokens=specials[3:])
    tokenizer.model_max_length = 128
    if chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tied, pad_token_id=0, eos_token_id=2, bos_token_id=None)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
