"""Numbers that are not finite: steps with NaN gradients are skipped on the device, a diverging run stops with a
clear error and keeps its last finite checkpoint, and no NaN is ever written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator
from safetensors.torch import load_file
from typer.testing import CliRunner

from lmtune.training.checkpoint import read_loop_state
from lmtune.training.guard import DivergedError
from lmtune.training.loop import fit

from training.test_loop import Toy, job, train_cfg  # noqa: E402


def nan_loss_at(steps: set[int], counter: list[int]):
    """A loss that is NaN on the given optimizer steps (counted by batches: batch_size rows per step)."""
    def loss(outputs, batch) -> torch.Tensor:
        counter[0] += 1
        return outputs.loss * float("nan") if counter[0] in steps else outputs.loss
    return loss


def _no_nan_in(folder: Path) -> None:
    """Every JSON file of a run parses as strict JSON (no NaN, Infinity)."""
    def refuse(token: str) -> None:
        raise AssertionError(f"{token} written in {path}")

    for path in [*folder.rglob("*.json"), *folder.rglob("*.jsonl")]:
        for line in path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]:
            if line.strip():
                json.loads(line, parse_constant=refuse)


def test_one_bad_step_is_skipped_and_training_goes_on(tmp_path, caplog) -> None:
    model, calls = Toy(), [0]
    toy = job(tmp_path, model)
    toy.loss = nan_loss_at({3}, calls)
    with caplog.at_level("WARNING", logger="lmtune"):
        state = fit(toy, train_cfg(log_every=4), Accelerator(cpu=True))
    assert state.skipped_steps == 1 and state.step == 16
    assert "1 of the last 4 optimizer steps were skipped" in caplog.text
    assert all(torch.isfinite(p).all() for p in model.parameters())
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "lr" in r]  # the mean over the steps taken
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    _no_nan_in(tmp_path)


def test_a_skipped_step_leaves_weights_and_optimizer_as_they_were(tmp_path) -> None:
    a, b = Toy(), Toy()
    fit(job(tmp_path / "a", a), train_cfg(max_steps=2, schedule="constant"), Accelerator(cpu=True))
    skipping = job(tmp_path / "b", b)
    skipping.loss = nan_loss_at({3}, [0])  # a third step, skipped: the weights stay those of step 2
    fit(skipping, train_cfg(max_steps=3, schedule="constant"), Accelerator(cpu=True))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_a_run_that_keeps_diverging_stops_and_keeps_its_last_finite_checkpoint(tmp_path) -> None:
    model = Toy()
    toy = job(tmp_path, model, evaluate=lambda m: {"loss": 1.0, "score": 0.5})
    toy.loss = nan_loss_at(set(range(5, 100)), [0])  # finite for 4 steps, NaN from then on
    with pytest.raises(DivergedError, match=r"diverged at step 14: the last 10 optimizer steps .* skipped "
                                            r"\(train.max_skipped_steps=10\); the last checkpoint .* step 12\) holds"):
        fit(toy, train_cfg(epochs=4, eval_every=2, log_every=2, checkpoint=True), Accelerator(cpu=True))
    last = tmp_path / "checkpoints" / "last"
    assert read_loop_state(last).step == 12
    weights = load_file(str(last / "state" / "model.safetensors"))
    # Steps 5.. were all skipped: the checkpoint holds step 4's weights, finite, as the model does now.
    for name, param in model.named_parameters():
        assert torch.isfinite(weights[name]).all()
        torch.testing.assert_close(weights[name], param.detach(), rtol=0, atol=0)
    _no_nan_in(tmp_path)


def test_a_nan_validation_loss_is_never_the_best_nor_checkpointed(tmp_path) -> None:
    scores = iter([{"loss": 1.0, "score": 0.2}, {"loss": math.nan, "score": 0.9}])
    toy = job(tmp_path, Toy(), evaluate=lambda m: next(scores))
    with pytest.raises(DivergedError, match="validation loss is not finite"):
        fit(toy, train_cfg(epochs=2, eval_every=4, checkpoint=True), Accelerator(cpu=True))
    assert read_loop_state(tmp_path / "checkpoints" / "last").best_step == 4
    _no_nan_in(tmp_path)


@pytest.mark.slow
def test_cli_run_with_an_absurd_learning_rate_fails_loudly_and_writes_no_nan(tiny_config, tmp_path) -> None:
    from lmtune.cli import app

    tiny_config["train"].update(lr=1e20, max_grad_norm=None, eval_every=2)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    result = CliRunner().invoke(app, ["train", str(config)])
    assert result.exit_code == 1, result.output
    said = " ".join(result.output.split())
    assert "training diverged at step" in said and "Traceback" not in result.output
    run = Path(tiny_config["output"]["dir"]) / "tiny"
    assert not (run / "model").exists() and not (run / "metrics.json").exists()  # no NaN model saved as the result
    _no_nan_in(run)
    last = run / "checkpoints" / "last"
    if last.is_dir():  # whatever was kept holds finite numbers
        assert all(torch.isfinite(w).all() for w in load_file(str(last / "state" / "model.safetensors")).values())


def test_weights_finite_skips_integer_storage_and_still_finds_a_nan() -> None:
    from lmtune.training.guard import weights_finite

    acc = Accelerator(cpu=True)
    packed = torch.nn.Parameter(torch.zeros(8, dtype=torch.uint8), requires_grad=False)  # like a 4-bit weight
    weight = torch.nn.Parameter(torch.ones(3))
    assert weights_finite([packed, weight], acc)
    weight.data[1] = float("nan")
    assert not weights_finite([packed, weight], acc)
