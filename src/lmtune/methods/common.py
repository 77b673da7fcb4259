"""Pieces methods share: the model cut into embeddings / layers / rest / head, LLRD groups, L2-SP."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from pydantic import BaseModel, ConfigDict

from lmtune.methods.stage import ParamGroup, Stage, TaskInfo
from lmtune.models import embedding_names, find_layers


@dataclass
class Parts:
    """Parameter names by position in the network, bottom to top."""

    embeddings: list[str]
    layers: list[list[str]]  # one list per transformer block, lowest first
    rest: list[str]          # backbone weights outside embeddings and blocks (final norm, pooler ...)
    head: list[str]          # the task head and any weight the checkpoint did not provide

    @property
    def backbone(self) -> list[str]:
        return self.embeddings + [n for layer in self.layers for n in layer] + self.rest


def parts(model: Any, info: TaskInfo) -> Parts:
    head = set(info.head_names)
    layers_name, stack = find_layers(model)
    layers = [[f"{layers_name}.{i}.{n}" for n, _ in block.named_parameters()] for i, block in enumerate(stack)]
    in_layers = {n for layer in layers for n in layer}
    embeddings = [n for n in embedding_names(model) if n not in head]
    rest = [n for n, _ in model.named_parameters() if n not in head and n not in in_layers and n not in embeddings]
    return Parts(embeddings, [[n for n in layer if n not in head] for layer in layers], rest,
                 [n for n, _ in model.named_parameters() if n in head])


class FineTuneOptions(BaseModel):
    """Options shared by the methods that fine-tune the whole backbone (full, lp_ft)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    head_lr: float | None = None
    """Learning rate of the new head while the backbone trains; default: the backbone's."""
    layer_decay: float | None = None
    """Layer-wise learning-rate decay: block l of L trains at lr * decay^(L - l), embeddings at
    lr * decay^(L + 1); e.g. 0.8. null = one rate for every layer."""
    gradual_unfreeze: bool = False
    """Unfreeze from the top: epoch 1 trains the head and the top block, each later epoch one block
    more, embeddings last (each epoch is a stage with its own optimizer and warmup)."""
    l2sp: float | None = None
    """L2-SP strength: penalise (strength/2)·||w - w_pretrained||² over the backbone, a forgetting
    mitigation; e.g. 0.01. null = off."""


def fine_tune_stages(model: Any, info: TaskInfo, options: FineTuneOptions, name: str, lr: float | None,
                     epochs: int | None) -> list[Stage]:
    """The backbone-training stage(s): one stage, or one per epoch with gradual unfreezing."""
    p = parts(model, info)
    penalty = l2sp_penalty(model, p.backbone, options.l2sp) if options.l2sp else None
    groups = _groups(p, lr, options)
    if not options.gradual_unfreeze:
        return [Stage(name, groups, epochs=epochs, penalty=penalty)]
    stages = []
    for epoch in range(epochs or info.epochs):
        # Top block first; blocks below stay frozen until their epoch; embeddings join after the last block.
        open_layers = p.layers[max(0, len(p.layers) - 1 - epoch):]
        trainable = set(p.head + p.rest + [n for layer in open_layers for n in layer])
        if epoch >= len(p.layers):
            trainable |= set(p.embeddings)
        stage_groups = [ParamGroup([n for n in g.names if n in trainable], g.lr, g.weight_decay, g.lr_scale)
                        for g in groups]
        stages.append(Stage(f"{name}-unfreeze{epoch + 1}", [g for g in stage_groups if g.names], epochs=1,
                            penalty=penalty))
    return stages


def _groups(p: Parts, lr: float | None, options: FineTuneOptions) -> list[ParamGroup]:
    head = ParamGroup(p.head, lr=options.head_lr or lr)
    if options.layer_decay is None:
        return [g for g in (ParamGroup(p.backbone, lr=lr), head) if g.names]
    depth, decay = len(p.layers), options.layer_decay
    groups = [ParamGroup(p.embeddings, lr=lr, lr_scale=decay ** (depth + 1))]
    groups += [ParamGroup(layer, lr=lr, lr_scale=decay ** (depth - i)) for i, layer in enumerate(p.layers)]
    groups += [ParamGroup(p.rest, lr=lr), head]
    return [g for g in groups if g.names]


def l2sp_penalty(model: Any, names: list[str], strength: float) -> Callable[[Any], torch.Tensor]:
    """(strength/2)·Σ||w - w0||² over `names`, w0 the values at the time of this call (the pretrained ones)."""
    params = dict(model.named_parameters())
    anchors = {n: params[n].detach().clone() for n in names}

    def penalty(current: Any) -> torch.Tensor:
        live = dict(current.named_parameters())
        total = torch.zeros((), device=next(iter(live.values())).device)
        for n, w0 in anchors.items():
            if w0.device != live[n].device:  # move the anchors once, to wherever the model went
                anchors[n] = w0 = w0.to(live[n].device)
            if live[n].requires_grad:
                total = total + ((live[n] - w0) ** 2).sum()
        return 0.5 * strength * total

    return penalty


def pooler_names(model: Any) -> set[str]:
    """Parameters of the backbone's pooler (found as the base model's `pooler` module), if it has one."""
    base = getattr(model, "base_model", None)
    pooler = getattr(base, "pooler", None)
    if not isinstance(pooler, torch.nn.Module):
        return set()
    owned = {id(p) for p in pooler.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in owned}
