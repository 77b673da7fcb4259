"""LP-FT: train the new head on the frozen backbone first (linear probe), then fine-tune everything."""

from __future__ import annotations

from typing import Any, Literal

from lmtune.methods.stage import head_parameters, Method, ParamGroup, Stage, TaskInfo
from lmtune.methods.common import FineTuneOptions, fine_tune_stages, pooler_names
from lmtune.registry import register_method


class LpFtOptions(FineTuneOptions):
    name: Literal["lp_ft"] = "lp_ft"
    """Two steps: the head alone on the frozen backbone, then all weights starting from that head."""
    probe_epochs: int = 5
    """Epochs of step 1 (head only; cheap with cached features)."""
    probe_lr: float = 1e-3
    """Learning rate of step 1."""
    cache_features: bool = True
    """Step 1 trains on stored outputs of the frozen stack (see method `head`)."""
    probe_pooler: bool = False
    """Step 1 also trains the backbone's pooler (BERT-style dense + tanh over [CLS]), which sentence-embedding
    models (mean-pooled, e.g. MiniLM) never trained: a much better probe there (benchmarks/RESULTS.md)."""
    epochs: int | None = None
    """Epochs of step 2 (everything); default: train.epochs."""
    lr: float | None = None
    """Learning rate of step 2; default: train.lr."""


@register_method("lp_ft")
class LpFt(Method):
    Options = LpFtOptions

    @staticmethod
    def apply(model: Any, info: TaskInfo, options: LpFtOptions) -> list[Stage]:
        head = head_parameters(model, info, "lp_ft")
        if options.probe_pooler:
            pooler = pooler_names(model)
            if not pooler:  # e.g. task.pooling mean (minilm-l6's default): the head reads no pooler, none is kept
                raise ValueError("method 'lp_ft': probe_pooler=true, but this model uses no pooler (task.pooling "
                                 "other than pooler, or a model without one): set task.pooling=pooler, or leave "
                                 "probe_pooler off")
            head += [n for n, _ in model.named_parameters() if n in pooler and n not in head]
        probe = Stage("probe", [ParamGroup(head, lr=options.probe_lr)], epochs=options.probe_epochs,
                      cache_features=options.cache_features)
        return [probe] + fine_tune_stages(model, info, options, "fine-tune", lr=options.lr, epochs=options.epochs)
