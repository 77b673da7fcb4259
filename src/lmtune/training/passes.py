"""Forward passes over a whole data set outside training steps: evaluation outputs and the feature cache's filling."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lmtune.training import feature_cache
from lmtune.training.batching import eval_batches, to_device


def iterate_outputs(model: Any, dataset: Any, collate: Callable, batch_size: int, accelerator: Any, *,
                    width: Callable[[int], int]) -> Iterator[tuple[list[int], Any, dict]]:
    """Forward passes over `dataset` in length-sorted batches: yields (row indices, outputs, batch).

    With several processes each runs its share and every process receives all results (on the CPU),
    so metrics are computed over the whole set everywhere.
    """
    world = accelerator.num_processes
    batches = eval_batches(dataset["length"][:], batch_size, width=width, rank=accelerator.process_index,
                           world_size=world)
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                        pin_memory=accelerator.device.type == "cuda" and len(batches) > 1)  # (a thread each)
    cache = feature_cache.find(model)
    if cache is not None:  # a stage with a frozen, cached trunk is evaluating: serve this set from memory too
        ensure_cached(cache, model, dataset, collate, batch_size, accelerator, width=width)
    was_training = model.training
    model.eval()  # always: a module added after loading (lmtune's head) can be training inside an eval-mode model
    results = []
    bar = _terminal_bar(sum(map(len, batches)), "evaluating", accelerator)
    try:  # a consumer that stops early or fails still gets the model back as it was
        with bar, torch.inference_mode(), accelerator.autocast():
            for indices, batch in zip(batches, loader):
                on_device = to_device(batch, accelerator.device)
                with (contextlib.nullcontext() if cache is None else
                      cache.serving(cache.serve(dataset._fingerprint, indices, batch["attention_mask"]))):
                    out = model(**on_device)
                bar.update(len(indices))
                if world == 1:
                    yield indices, out, batch
                else:
                    results.append((indices, {k: v.float().cpu() for k, v in out.items()}, batch))
    finally:
        if was_training:  # (a second walk over every module only where there is something to restore)
            model.train()
    if world > 1:
        from accelerate.utils import gather_object

        for indices, out, batch in gather_object(results):
            yield indices, SimpleNamespace(**out), batch


def ensure_cached(cache: Any, model: Any, dataset: Any, collate: Callable, batch_size: int, accelerator: Any, *,
                  width: Callable[[int], int]) -> None:
    """Fill the feature cache for `dataset` (all rows, frozen trunk in eval mode) unless already there."""
    key = dataset._fingerprint
    if key in cache.tables:
        return
    lengths = dataset["length"][:]
    batches = eval_batches(lengths, batch_size, width=width)
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate, generator=torch.Generator())
    was_training = model.training
    model.eval()  # always: a module added after loading (lmtune's head) can be training inside an eval-mode model
    bar = _terminal_bar(len(dataset), "caching features", accelerator)

    def counted() -> Iterator[tuple[list[int], dict]]:
        for rows, batch in zip(batches, loader):
            yield rows, batch
            bar.update(len(rows))

    with bar, accelerator.autocast():
        cache.build(key, counted(), lambda b: model(**to_device(b, accelerator.device)), len(dataset),
                    sum(lengths), accelerator.device)
    model.train(was_training)


def _terminal_bar(rows: int, desc: str, accelerator: Any) -> Any:
    """A progress bar of rows, on a terminal only (disable=None): a long pass on a CPU shows its progress, logs stay
    free of bar lines, other processes show none."""
    return tqdm(total=rows, desc=desc, unit="row", leave=False, dynamic_ncols=True,
                disable=None if accelerator.is_local_main_process else True)
