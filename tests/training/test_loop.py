"""The loop on a toy regression model: accumulation, early stopping, best weights, stages."""

from __future__ import annotations

from types import SimpleNamespace

import datasets
import pytest
import torch
from accelerate import Accelerator

from lmtune.config import TrainConfig
from lmtune.methods import ParamGroup, Stage
from lmtune.training.loop import Job, fit


class Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=torch.nn.functional.mse_loss(self.head(self.body(x)).squeeze(-1), y))


def toy_data(n: int = 64) -> datasets.Dataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    return datasets.Dataset.from_dict({"x": x.tolist(), "y": y.tolist(), "length": [4] * n})


def collate(rows: list[dict]) -> dict:
    return {"x": torch.tensor([r["x"] for r in rows]), "y": torch.tensor([r["y"] for r in rows])}


def job(tmp_path, model: Toy, stages: list[Stage] | None = None, evaluate=None) -> Job:
    names = [n for n, _ in model.named_parameters()]
    return Job(model=model, stages=stages or [Stage("all", [ParamGroup(names)])], train_set=toy_data(),
               collate=collate, evaluate=evaluate, metric="score", greater_is_better=True, run_dir=tmp_path,
               width=int)


def train_cfg(**kw) -> TrainConfig:
    base = dict(epochs=2, batch_size=8, lr=0.05, warmup_ratio=0.0, weight_decay=0.0, group_by_length=False,
                max_grad_norm=None, checkpoint=False)
    return TrainConfig(**{**base, **kw})


def test_gradient_accumulation_equals_a_bigger_batch(tmp_path) -> None:
    a, b = Toy(), Toy()
    fit(job(tmp_path / "a", a), train_cfg(batch_size=8), Accelerator(cpu=True))
    state = fit(job(tmp_path / "b", b), train_cfg(batch_size=4, grad_accum=2), Accelerator(cpu=True))
    assert state.step == 16  # 64 rows / 8 per step * 2 epochs
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_loss_falls(tmp_path) -> None:
    model = Toy()
    data = toy_data()
    before = model(**collate(list(data))).loss.item()
    fit(job(tmp_path, model), train_cfg(epochs=5), Accelerator(cpu=True))
    assert model(**collate(list(data))).loss.item() < 0.2 * before


def test_early_stopping_restores_the_best_weights(tmp_path) -> None:
    scores = iter([0.1, 0.5, 0.4, 0.45, 0.3, 0.9])
    snapshots = []

    def evaluate(model) -> dict:
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"score": next(scores)}

    model = Toy()
    state = fit(job(tmp_path, model, evaluate=evaluate),
                train_cfg(epochs=10, eval_every=2, early_stopping_patience=2), Accelerator(cpu=True))
    assert len(snapshots) == 4 and state.step == 8  # stopped after two evaluations without improvement
    assert (state.best_metric, state.best_step) == (0.5, 4)
    for key, value in model.state_dict().items():
        assert torch.equal(value, snapshots[1][key]), key


def test_stages_train_only_their_parameters(tmp_path) -> None:
    model = Toy()
    body_before = model.body.weight.detach().clone()
    head_before = model.head.weight.detach().clone()
    stages = [Stage("head", [ParamGroup(["head.weight", "head.bias"], lr=0.1)], epochs=1),
              Stage("all", [ParamGroup(["body.weight", "body.bias", "head.weight", "head.bias"])], epochs=1)]
    seen = []

    def callback(state) -> None:
        seen.append((state.stage, torch.equal(model.body.weight, body_before)))

    j = job(tmp_path, model, stages)
    j.callbacks.append(callback)
    state = fit(j, train_cfg(), Accelerator(cpu=True))
    assert state.step == 16 and set(state.stage_seconds) == {"head", "all"}
    assert all(unchanged for stage, unchanged in seen if stage == 0)  # body frozen in stage 1
    assert not torch.equal(model.body.weight, body_before) and not torch.equal(model.head.weight, head_before)


def test_a_later_stage_that_never_improves_ends_with_the_earlier_best_and_says_so(tmp_path, caplog) -> None:
    scores = iter([0.9, 0.5, 0.6])  # stage "head": one evaluation; stage "all": two, both worse
    model = Toy()
    stages = [Stage("head", [ParamGroup(["head.weight", "head.bias"])], epochs=1),
              Stage("all", [ParamGroup(["body.weight", "body.bias", "head.weight", "head.bias"])], epochs=2)]
    snapshots = []

    def evaluate(m) -> dict:
        snapshots.append({k: v.clone() for k, v in m.state_dict().items()})
        return {"score": next(scores)}

    with caplog.at_level("WARNING", logger="lmtune"):
        state = fit(job(tmp_path, model, stages, evaluate), train_cfg(), Accelerator(cpu=True))
    assert (state.best_metric, state.best_step) == (0.9, 8)
    assert "stage all never beat the score of an earlier stage (0.9000 at step 8)" in caplog.text
    for key, value in model.state_dict().items():
        assert torch.equal(value, snapshots[0][key]), key


def test_metric_missing_from_evaluation_is_an_error(tmp_path) -> None:
    from lmtune.config import ConfigError

    with pytest.raises(ConfigError, match=r"eval.metric 'score' is not a metric of this task \(its metrics: accuracy\)"):
        fit(job(tmp_path, Toy(), evaluate=lambda m: {"accuracy": 1.0}), train_cfg(), Accelerator(cpu=True))


def test_label_smoothing_loss_matches_the_model_and_penalises_certainty(tiny_model_dir) -> None:
    from transformers import AutoModelForSequenceClassification

    from lmtune.training.losses import cross_entropy_loss

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3).eval()
    batch = {"input_ids": torch.tensor([[2, 5, 6, 3], [2, 7, 3, 0]]), "attention_mask": torch.tensor(
        [[1, 1, 1, 1], [1, 1, 1, 0]]), "labels": torch.tensor([0, 2])}
    out = model(**batch)
    assert cross_entropy_loss([("logits", "labels")], 0.0)(out, batch).item() == pytest.approx(out.loss.item())
    assert abs(cross_entropy_loss([("logits", "labels")], 0.1)(out, batch).item() - out.loss.item()) > 1e-4
    # A perfectly fitted batch: no loss left without smoothing, a floor with it; -100 targets are ignored.
    certain = SimpleNamespace(logits=torch.tensor([[[50.0, 0.0], [0.0, 50.0]]]))
    targets = {"labels": torch.tensor([[0, -100]])}
    assert cross_entropy_loss([("logits", "labels")], 0.0)(certain, targets).item() < 1e-6
    smoothed = cross_entropy_loss([("logits", "labels")], 0.2)(certain, targets).item()
    assert smoothed == pytest.approx(0.1 * 50, rel=1e-3)  # 0.2 spread over 2 classes: 0.1 on the wrong one
    qa = SimpleNamespace(start_logits=torch.tensor([[9.0, 0.0]]), end_logits=torch.tensor([[0.0, 9.0]]))
    both = cross_entropy_loss([("start_logits", "s"), ("end_logits", "e")], 0.0)(
        qa, {"s": torch.tensor([0]), "e": torch.tensor([0])})
    assert both.item() == pytest.approx(9.0 / 2, rel=1e-3)  # start right (~0), end wrong (~9): mean of the two


@pytest.mark.skipif(__import__("shutil").which("cc") is None, reason="torch.compile on the CPU needs a C compiler")
def test_compiled_training_ends_with_the_same_weights(tmp_path) -> None:
    plain, compiled = Toy(), Toy()
    fit(job(tmp_path / "a", plain), train_cfg(), Accelerator(cpu=True))
    calls = []
    compiled.compile = lambda **kw: (calls.append(kw), torch.nn.Module.compile(compiled, **kw))  # type: ignore
    fit(job(tmp_path / "b", compiled), train_cfg(compile=True), Accelerator(cpu=True))
    assert len(calls) == 1  # compiled in place for the stage: names and state dict unchanged
    assert compiled._compiled_call_impl is None  # and plain again afterwards (evaluation, generation)
    assert list(compiled.state_dict()) == list(plain.state_dict())
    for (name, p), q in zip(plain.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


class Blocks(torch.nn.Module):
    """A stack of same-type blocks, as transformers have."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> SimpleNamespace:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return SimpleNamespace(loss=torch.nn.functional.mse_loss(self.head(x).squeeze(-1), y))


@pytest.mark.skipif(__import__("shutil").which("cc") is None, reason="torch.compile on the CPU needs a C compiler")
def test_compile_takes_each_block_of_a_stack(tmp_path) -> None:
    plain, compiled = Blocks(), Blocks()
    fit(job(tmp_path / "a", plain), train_cfg(), Accelerator(cpu=True))
    seen, evaluated = [], []
    compiled.register_forward_hook(lambda m, i, o: seen.append([b._compiled_call_impl is not None for b in m.layers]))

    def evaluate(model: Blocks) -> dict:
        evaluated.append([b._compiled_call_impl is not None for b in model.layers])
        return {"score": 0.0}

    fit(job(tmp_path / "b", compiled, evaluate=evaluate), train_cfg(compile=True, load_best=False),
        Accelerator(cpu=True))
    assert seen and all(flags == [True, True, True] for flags in seen)  # while training, every block compiled
    assert evaluated and all(flags == [False, False, False] for flags in evaluated)  # evaluation runs plain
    assert compiled._compiled_call_impl is None and all(b._compiled_call_impl is None for b in compiled.layers)
    for (name, p), q in zip(plain.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


class Unit(torch.nn.Module):
    """Every batch's (mean) loss is 1: what the loop logs is then the weight it gave the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, n: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=1.0 + 0.0 * self.w.sum())


@pytest.mark.parametrize("normalization, expected", [("batch", [1.0, 1.0, 1.0, 1.0]),
                                                     ("dataset", [0.5, 1.5, 0.5, 1.5])])
def test_token_loss_normalised_by_the_batch_or_the_dataset_mean(tmp_path, normalization, expected) -> None:
    import json

    from lmtune.training.losses import mean_targets_per_batch

    rows = datasets.Dataset.from_dict({"n": [1, 3], "length": [1, 3]})  # targets per row: 1 and 3

    def count(batch: dict) -> torch.Tensor:
        return batch["n"].sum()

    def collate_n(part: list[dict]) -> dict:
        return {"n": torch.tensor([r["n"] for r in part])}

    assert mean_targets_per_batch(list(rows), collate_n, count, batch_size=1) == 2.0
    assert mean_targets_per_batch(list(rows), collate_n, count, batch_size=2, chunk=1) == 4.0
    model = Unit()
    j = Job(model=model, stages=[Stage("all", [ParamGroup(["w"])])], train_set=rows, collate=collate_n,
            evaluate=None, metric="score", greater_is_better=True, run_dir=tmp_path, width=int,
            count_targets=count)
    fit(j, train_cfg(batch_size=1, log_every=1, loss_normalization=normalization), Accelerator(cpu=True))
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in logged if "train/loss" in r]
    # Each step is one row (group_by_length off, order shuffled): its loss is 1 x its weight.
    assert sorted(losses) == sorted(expected)


def test_weight_average_is_what_gets_evaluated_and_kept_while_training_goes_on_from_the_weights(tmp_path) -> None:
    def trajectory(cfg, folder):
        model = Toy()
        snapshot = lambda: {k: v.detach().clone() for k, v in model.state_dict().items()}  # noqa: E731
        weights, evaluated = [snapshot()], []

        def evaluate(m) -> dict:
            evaluated.append(snapshot())
            return {"score": float(len(evaluated))}  # every evaluation better: the last one is kept

        j = job(folder, model, evaluate=evaluate)
        j.callbacks.append(lambda state: weights.append(snapshot()))
        fit(j, cfg, Accelerator(cpu=True))
        return weights, evaluated, snapshot()

    plain, _, _ = trajectory(train_cfg(eval_every=4), tmp_path / "plain")
    weights, evaluated, final = trajectory(train_cfg(eval_every=4, ema_decay=0.75), tmp_path / "ema")
    assert len(weights) == 17
    for a, b in zip(plain, weights):  # averaging changes nothing about the training itself
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    average, expected = dict(weights[0]), []
    for step, w in enumerate(weights[1:], 1):  # a plain mean up to step 3, then decay 0.75
        share = 1 - min(0.75, step / (step + 1))
        average = {k: v + share * (w[k] - v) for k, v in average.items()}
        expected.append(average)
    torch.testing.assert_close(expected[2]["head.weight"], sum(w["head.weight"] for w in weights[:4]) / 4)
    for seen, want in zip(evaluated, expected[3::4]):
        for key in want:
            torch.testing.assert_close(seen[key], want[key], rtol=1e-6, atol=1e-7, msg=key)
    for key in final:
        torch.testing.assert_close(final[key], expected[-1][key], rtol=1e-6, atol=1e-7, msg=key)
        assert not torch.allclose(final[key], weights[-1][key])
