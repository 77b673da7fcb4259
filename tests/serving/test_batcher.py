"""The batcher alone (no HTTP): a request whose first part fails runs none of its other parts."""

from __future__ import annotations

import asyncio
import logging

import pytest

from lmtune.serving.batching import Batcher, ItemsError


def test_a_failed_part_cancels_the_rest_of_its_request(caplog: pytest.LogCaptureFixture) -> None:
    passes: list[list[str]] = []

    def predict(items: list[str], key: object) -> list[str]:
        passes.append(items)
        if "BAD" in items:
            raise ValueError("bad input")
        return [item.upper() for item in items]

    async def main() -> tuple[ItemsError, list[str]]:
        batcher = Batcher(predict, max_batch_size=2, max_wait_ms=20)
        batcher.start()
        try:
            with pytest.raises(ItemsError) as failed:
                await batcher.submit(["BAD", "x", "y", "z", "w", "BAD"])
            good = await batcher.submit(["a", "b", "c"])  # the batcher goes on
            await asyncio.sleep(0.1)
        finally:
            await batcher.stop()
        return failed.value, good

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        failed, good = asyncio.run(main())
    assert failed.start == 0 and str(failed.error) == "bad input"
    assert good == ["A", "B", "C"]
    assert ["y", "z"] not in passes and ["w", "BAD"] not in passes  # the failed request's other parts never ran
    assert "never retrieved" not in caplog.text
