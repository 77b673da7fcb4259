"""The feature cache serves exactly what the frozen module computed, for any batch make-up and padding side."""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from lmtune.training.feature_cache import FeatureCache, install


class Trunk(torch.nn.Module):
    """Per-token and per-row outputs that depend on the token ids, so a wrong row or position shows."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 4)

    def forward(self, input_ids, attention_mask):
        hidden = self.embed(input_ids) * attention_mask[..., None]
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=hidden.sum(1))


def _batch(rows: list[list[int]], left: bool) -> dict:
    width = max(map(len, rows)) + 2
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span], mask[i, span] = torch.tensor(row), 1
    return {"input_ids": ids, "attention_mask": mask}


def test_served_outputs_equal_computed_ones_in_any_order_and_padding() -> None:
    torch.manual_seed(0)
    data = [torch.randint(1, 50, (n,)).tolist() for n in (3, 7, 1, 5, 4, 6)]
    trunk = Trunk()
    cache = FeatureCache(trunk, "trunk")
    order = [[4, 1], [0, 5, 2], [3]]  # built in an order unlike the dataset's
    cache.build("d", ((rows, _batch([data[r] for r in rows], left=False)) for rows in order),
                lambda b: trunk(**b), n_rows=6, n_tokens=sum(map(len, data)), device=torch.device("cpu"))
    for rows, left in (([2, 0, 5], True), ([1, 3, 4, 0], False), ([5], True)):
        batch = _batch([data[r] for r in rows], left)
        cache.current = None
        expected = trunk(**batch)
        cache.current = cache.serve("d", rows, batch["attention_mask"])
        served = trunk(**batch)
        torch.testing.assert_close(served.last_hidden_state, expected.last_hidden_state)
        torch.testing.assert_close(served.pooler_output, expected.pooler_output)
    cache.remove()
    assert "forward" not in vars(trunk)


def test_the_trunk_is_served_inside_the_block_only_and_runs_again_after_it_even_after_an_error() -> None:
    torch.manual_seed(0)
    data = [torch.randint(1, 50, (n,)).tolist() for n in (3, 2)]
    trunk = Trunk()
    cache = FeatureCache(trunk, "trunk")
    cache.build("d", [([0, 1], _batch(data, left=False))], lambda b: trunk(**b), n_rows=2, n_tokens=5,
                device=torch.device("cpu"))
    batch = _batch(data, left=False)
    stale = {"last_hidden_state": torch.zeros(2, 5, 4), "pooler_output": torch.zeros(2, 4)}
    with cache.serving(stale):
        assert trunk(**batch).pooler_output.eq(0).all()
    assert cache.current is None and trunk(**batch).pooler_output.ne(0).any()
    with pytest.raises(KeyError), cache.serving(cache.serve("d", [0, 1], batch["attention_mask"])):
        raise KeyError("a failing step")
    assert cache.current is None


def test_per_row_output_is_not_mistaken_for_per_token_when_width_equals_hidden_size() -> None:
    torch.manual_seed(0)
    data = [torch.randint(1, 50, (2,)).tolist() for _ in range(3)]  # padded width 4 = the trunk's hidden size
    trunk = Trunk()
    cache = FeatureCache(trunk, "trunk")
    cache.build("d", [([0, 1, 2], _batch(data, left=False))], lambda b: trunk(**b), n_rows=3, n_tokens=6,
                device=torch.device("cpu"))
    batch = _batch([data[2], data[0]], left=False)
    cache.current = None
    expected = trunk(**batch)
    cache.current = cache.serve("d", [2, 0], batch["attention_mask"])
    served = trunk(**batch)
    torch.testing.assert_close(served.pooler_output, expected.pooler_output)
    torch.testing.assert_close(served.last_hidden_state, expected.last_hidden_state)


def test_install_caches_the_outermost_frozen_module_and_says_why_not() -> None:
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=16))
    assert install(model, "bert.encoder.layer", {"classifier.weight"}).name == "bert"
    assert install(model, "bert.encoder.layer", {"bert.pooler.dense.weight"}).name == "bert.encoder"
    assert "inside bert.encoder train" in install(model, "bert.encoder.layer", {"bert.encoder.layer.1.output.dense.bias"})
