"""CUDA-graph step replay: its bookkeeping (on a stand-in recorder) and the loop's graph path.

No CUDA here: `Recorder` stands in for torch.cuda.graph. It replays by calling the step on the static buffers,
so it checks that everything a step needs reaches it through the inputs copied before each replay, that the
learning rate lives in a tensor the scheduler updates, and that gradients are kept and zeroed, not freed. What
only a real GPU can check (a step recorded once computes the same as eager steps) is in the benchmarks.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

import lmtune
from lmtune.config import TrainConfig
from lmtune.methods import ParamGroup, Stage
from lmtune.training import graphs, loop
from lmtune.training.graphs import StepGraphs, signature
from lmtune.training.loop import fit

from test_loop import Toy, Unit, job, train_cfg


class Recorder:
    def __init__(self, device: torch.device | str = "cpu", fail: bool = False) -> None:
        self.captures, self.replays, self.fail = 0, 0, fail

    def buffer(self, value):
        return torch.zeros(()) if isinstance(value, float) else torch.empty(value.shape, dtype=value.dtype)

    def capture(self, fn, static):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing\nmore")
        self.captures += 1

        def replay() -> None:
            self.replays += 1
            fn(static)
        return replay


def test_a_shape_runs_eagerly_first_then_is_recorded_and_replayed_with_each_call_s_inputs() -> None:
    seen = []
    recorder = Recorder()
    steps = StepGraphs({"f": lambda inputs: seen.append((inputs["x"].clone(), float(inputs["s"])))}, "cpu",
                       backend=recorder)
    steps("f", {"x": torch.tensor([1.0, 2.0]), "s": 0.5})
    assert recorder.captures == 0 and seen[-1][0].tolist() == [1.0, 2.0]
    steps("f", {"x": torch.tensor([3.0, 4.0]), "s": 0.25})
    steps("f", {"x": torch.tensor([5.0, 6.0]), "s": 2.0})
    assert recorder.captures == 1 and recorder.replays == 2
    assert [(x.tolist(), s) for x, s in seen[1:]] == [([3.0, 4.0], 0.25), ([5.0, 6.0], 2.0)]
    steps("f", {"x": torch.tensor([7.0, 8.0, 9.0]), "s": 1.0})  # a new shape: eager once more
    assert recorder.captures == 1 and seen[-1][0].tolist() == [7.0, 8.0, 9.0]


def test_signature_tells_shapes_and_dtypes_apart_but_not_float_values() -> None:
    a = signature({"x": torch.zeros(2, 3), "s": 0.5})
    assert a == signature({"x": torch.ones(2, 3), "s": 2.0})
    assert a != signature({"x": torch.zeros(2, 4), "s": 0.5})
    assert a != signature({"x": torch.zeros(2, 3, dtype=torch.int64), "s": 0.5})


def test_a_failed_recording_turns_graphs_off_with_a_warning_and_the_step_still_runs(caplog) -> None:
    calls = []
    steps = StepGraphs({"f": lambda inputs: calls.append(1)}, "cpu", backend=Recorder(fail=True))
    with caplog.at_level(logging.WARNING, logger="lmtune"):
        for _ in range(4):
            steps("f", {"x": torch.zeros(2)})
    assert len(calls) == 4 and steps.graphs == {}
    assert "operation not permitted" in steps.failed and "more" not in steps.failed
    assert sum("recording the f step failed" in r.message for r in caplog.records) == 1


def test_past_the_limit_new_shapes_stay_eager() -> None:
    recorder = Recorder()
    steps = StepGraphs({"f": lambda inputs: None}, "cpu", limit=2, backend=recorder)
    for width in (1, 2, 3, 1, 2, 3, 3):
        steps("f", {"x": torch.zeros(width)})
    assert recorder.captures == 2 and len(steps.graphs) == 2


@pytest.fixture
def recorded(monkeypatch):
    """The loop's graph path on the CPU: graphs allowed whenever train.cuda_graphs is on, recorded by Recorder."""
    recorders: list[Recorder] = []

    def backend(device):
        recorders.append(Recorder(device))
        return recorders[-1]

    real = graphs.unavailable
    monkeypatch.setattr(graphs, "unavailable", lambda cfg, acc: None if cfg.cuda_graphs else "off")
    assert real(TrainConfig(cuda_graphs=True), Accelerator(cpu=True)) == "not on a CUDA device"
    monkeypatch.setattr(graphs, "CudaBackend", backend)
    return recorders


def test_the_loop_through_recorded_steps_ends_with_the_eager_weights(tmp_path, recorded) -> None:
    eager, graphed = Toy(), Toy()
    # Uneven accumulation windows (13 batches of 5 in windows of 2), clipping, warmup + decay, a penalty.
    stages = lambda m: [Stage("body", [ParamGroup(["body.weight", "body.bias"])], epochs=1,  # noqa: E731
                              penalty=lambda model: 0.1 * model.body.weight.square().sum()),
                        Stage("all", [ParamGroup([n for n, _ in m.named_parameters()], lr_scale=0.5)])]
    cfg = dict(batch_size=5, grad_accum=2, max_grad_norm=0.5, warmup_ratio=0.2, epochs=3, checkpoint=True,
               log_every=1)
    fit(job(tmp_path / "a", eager, stages(eager)), train_cfg(cuda_graphs=False, **cfg), Accelerator(cpu=True))
    assert not recorded
    state = fit(job(tmp_path / "b", graphed, stages(graphed)), train_cfg(cuda_graphs=True, **cfg),
                Accelerator(cpu=True))
    assert len(recorded) == 2 and all(r.captures >= 2 and r.replays > 10 for r in recorded)  # one per stage
    assert state.step == 7 + 21
    for (name, p), q in zip(eager.named_parameters(), graphed.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    logs = [(tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in "ab"]
    assert len(logs[0]) == len(logs[1])
    assert '"lr"' in logs[1][-1]


def test_a_run_through_recorded_steps_resumes_exactly(tmp_path, recorded) -> None:
    straight, resumed = Toy(), Toy()
    cfg = train_cfg(epochs=3, checkpoint=True, eval_every=3, warmup_ratio=0.3)
    evaluate = lambda m: {"score": 0.0}  # noqa: E731
    fit(job(tmp_path / "a", straight, evaluate=evaluate), cfg, Accelerator(cpu=True))

    class Stop(Exception):
        pass

    def crash(state) -> None:
        if state.step == 7:
            raise Stop

    run = job(tmp_path / "b", resumed, evaluate=evaluate)
    run.callbacks = [crash]
    with pytest.raises(Stop):
        fit(run, cfg, Accelerator(cpu=True))
    fresh = Toy()
    fit(job(tmp_path / "b", fresh, evaluate=evaluate), cfg, Accelerator(cpu=True), resume=True)
    for (name, p), q in zip(straight.named_parameters(), fresh.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


def test_lp_ft_on_cached_features_through_recorded_steps_matches_eager(tiny_config, recorded) -> None:
    tiny_config["method"] = {"name": "lp_ft", "probe_epochs": 2}
    runs = {}
    for flag in (False, True):
        cfg = copy.deepcopy(tiny_config)
        cfg["train"]["cuda_graphs"] = flag
        cfg["output"]["name"] = f"graphs-{flag}"
        runs[flag] = lmtune.train(cfg)
    assert recorded and recorded[0].replays > 0
    assert runs[True].metrics["stages"]["probe"]["feature_cache"]  # the head stage served cached features
    a, b = (load_file(str(Path(r.run_dir) / "model" / "model.safetensors")) for r in runs.values())
    for key in a:  # AdamW's step in float32 tensor arithmetic (tensor lr), not Python floats: rounding differs
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-5, msg=key)
    test = [r.metrics["test"] for r in runs.values()]
    assert test[0]["accuracy"] == test[1]["accuracy"] and test[0]["loss"] == pytest.approx(test[1]["loss"], abs=1e-4)


def test_token_counts_reach_recorded_steps_as_tensors(tmp_path, recorded) -> None:
    """NER/LM losses are weighted by target counts, a device tensor per batch: it must be an input of the graph."""
    import json

    import datasets

    rows = datasets.Dataset.from_dict({"n": [1, 3, 1, 3, 1, 3], "length": [1, 3, 1, 3, 1, 3]})

    def collate_n(part: list[dict]) -> dict:
        return {"n": torch.tensor([r["n"] for r in part])}

    j = loop.Job(model=Unit(), stages=[Stage("all", [ParamGroup(["w"])])], train_set=rows, collate=collate_n,
                 evaluate=None, metric="score", greater_is_better=True, run_dir=tmp_path, width=int,
                 count_targets=lambda batch: batch["n"].sum())
    fit(j, train_cfg(batch_size=1, log_every=1, epochs=2, loss_normalization="dataset", cuda_graphs=True),
        Accelerator(cpu=True))
    assert recorded[0].replays >= 8  # batches of 1 and 3 targets share one signature: most steps replayed
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # Mean targets per batch is 2: a batch of 1 target weighs 0.5, one of 3 weighs 1.5, replayed or not.
    assert sorted(r["train/loss"] for r in logged if "train/loss" in r) == [0.5] * 6 + [1.5] * 6


def test_optimizer_groups_follow_the_mode_whatever_a_resumed_checkpoint_said() -> None:
    from lmtune.training.graphs import optimizer_mode

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([{"params": [weight], "lr": 0.1}], foreach=False)
    optimizer_mode(optimizer, torch.device("cpu"), recorded=True)
    group = optimizer.param_groups[0]
    assert torch.is_tensor(group["lr"]) and float(group["lr"]) == pytest.approx(0.1) and group["capturable"]
    optimizer_mode(optimizer, torch.device("cpu"), recorded=False)  # e.g. a recorded run resumed on a CPU
    assert group["lr"] == pytest.approx(0.1) and not torch.is_tensor(group["lr"]) and not group["capturable"]
    weight.grad = torch.ones(3)
    optimizer.step()
    assert weight.detach().lt(1).all()


def test_kept_gradients_are_freed_when_a_recorded_stage_ends(tmp_path, recorded) -> None:
    model = Toy()
    fit(job(tmp_path, model), train_cfg(cuda_graphs=True), Accelerator(cpu=True))
    assert recorded and all(p.grad is None for p in model.parameters())
