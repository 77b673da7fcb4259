"""train.ema_decay's weight average: files a resumed run reads on any number of processes, swaps only to evaluate."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from lmtune.training import averaging
from lmtune.training.averaging import WeightAverage
from lmtune.training.loop import fit

from test_loop import Toy, job, train_cfg


def test_one_file_written_by_the_main_process_and_read_by_any_unless_sharded(tmp_path) -> None:
    params = [torch.nn.Parameter(torch.ones(3))]
    main, other = WeightAverage(params, 0.9, writes=True), WeightAverage(params, 0.9, writes=False)
    main.average[0].fill_(2.0)
    other.save(tmp_path)
    assert not any(tmp_path.iterdir())
    main.save(tmp_path)
    resumed = WeightAverage(params, 0.9, writes=False)  # e.g. the second of two processes, after one wrote it
    resumed.load(tmp_path)
    assert torch.equal(resumed.average[0], torch.full((3,), 2.0))
    with pytest.raises(RuntimeError, match="holds no weight_average-1.safetensors"):
        WeightAverage(params, 0.9, shard=1, writes=False).load(tmp_path)


def test_the_swap_exchanges_values_in_place_and_back(tmp_path) -> None:
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(4))]
    average = WeightAverage(params, 0.5)
    storage = [p.data_ptr() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    average.update(1)  # halfway: 0.5
    with average.swapped_in():
        assert all(torch.equal(p, torch.full_like(p, 0.5)) for p in params)
    assert all(torch.equal(p, torch.ones_like(p)) for p in params)
    assert [p.data_ptr() for p in params] == storage  # recorded CUDA graphs keep seeing the same tensors


def test_no_swap_without_anything_to_evaluate(tmp_path, monkeypatch) -> None:
    swaps = []
    monkeypatch.setattr(averaging.WeightAverage, "_swap", lambda self: swaps.append(1))
    fit(job(tmp_path, Toy()), train_cfg(eval_every=2, ema_decay=0.9), Accelerator(cpu=True))
    assert swaps == []
