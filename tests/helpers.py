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
