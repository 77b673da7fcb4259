"""lmtune's learning-rate schedules are transformers' (linear, cosine, constant with warmup), step for step."""

import types

import pytest
import torch

from lmtune.training.setup import schedule


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("total, warmup_ratio", [(1, 0.0), (7, 0.0), (50, 0.1), (33, 0.5), (10, 1.0)])
def test_schedule_matches_transformers(kind, total, warmup_ratio):
    from transformers import get_scheduler

    def lrs(make):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=0.5)
        sched = make(opt)
        seen = []
        for _ in range(total + 3):  # past the end too
            seen.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return seen

    cfg = types.SimpleNamespace(schedule=kind, warmup_ratio=warmup_ratio)
    ours = lrs(lambda opt: schedule(opt, cfg, total))
    theirs = lrs(lambda opt: get_scheduler("constant_with_warmup" if kind == "constant" else kind, opt,
                                           num_warmup_steps=int(warmup_ratio * total), num_training_steps=total))
    assert ours == pytest.approx(theirs, abs=1e-15)
    assert max(ours) <= 0.5
