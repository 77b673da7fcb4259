"""Pooling heads for sequence-level tasks (classification, regression): `task.pooling` says which vector of the
backbone's output the head reads, `task.head` what the head is.

`auto` takes what the checkpoint was trained for: a sentence-embedding checkpoint's own pooling (its
`modules.json` / `1_Pooling/config.json`, e.g. mean for all-MiniLM-L6-v2), else the transformers class's own head
(BERT's [CLS] pooler, a decoder's last real token). Any other choice replaces that head with lmtune's: the pooled
vector into a linear layer (or a small MLP). Its weights are saved under `lmtune_head.` in the model's own weight
file and its settings as `lmtune_pooling`, `lmtune_head`, ... in config.json; `lmtune.load`, predict, eval, serve
and the ONNX export restore it exactly. A plain `transformers` pipeline cannot: it builds the class's own head
instead (see the saved model card). No remote code is involved anywhere.
"""

from __future__ import annotations

import json
import logging
import types
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict

log = logging.getLogger("lmtune")

MODES = ("cls", "pooler", "mean", "max", "last")
PREFIX = "lmtune_head"
# sentence-transformers' Pooling config keys -> our modes (several set: the first here wins)
_SENTENCE_MODES = (("pooling_mode_mean_tokens", "mean"), ("pooling_mode_cls_token", "cls"),
                   ("pooling_mode_max_tokens", "max"), ("pooling_mode_lasttoken", "last"),
                   ("pooling_mode_mean_sqrt_len_tokens", "mean"), ("pooling_mode_weightedmean_tokens", "mean"))


class PoolingOptions(BaseModel):
    """Options of the sequence-level heads, shared by classification and regression."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    pooling: Literal["auto", "cls", "pooler", "mean", "max", "last"] = "auto"
    """The vector the head reads: `auto` (what the checkpoint was trained for: a sentence-embedding checkpoint's own
    pooling, e.g. mean for minilm-l6, else the model class's own head), `cls` (the first token's hidden state),
    `pooler` (the backbone's pooler output, e.g. BERT's), `mean` / `max` over the real tokens, `last` (the last real
    token, as decoders classify)."""
    head: Literal["linear", "mlp"] = "linear"
    """What turns the pooled vector into scores: one linear layer, or an MLP with one hidden layer (GELU)."""
    head_hidden: int | None = None
    """Width of the MLP's hidden layer; default: the backbone's hidden size."""
    head_dropout: float = 0.1
    """Dropout before each of the head's linear layers (the head alone; model.dropout is the backbone's)."""


def sentence_pooling(folder: Path) -> str | None:
    """The pooling a sentence-transformers checkpoint in `folder` was trained with, or None where it has none."""
    path = "1_Pooling"
    modules = folder / "modules.json"
    if modules.is_file():
        try:
            listed = json.loads(modules.read_text(encoding="utf-8"))
            path = next((m.get("path") for m in listed if str(m.get("type", "")).endswith("Pooling")), path)
        except (ValueError, AttributeError):
            pass
    config = folder / path / "config.json"
    if not config.is_file():
        return None
    try:
        settings = json.loads(config.read_text(encoding="utf-8"))
    except ValueError:
        return None
    return next((mode for key, mode in _SENTENCE_MODES if settings.get(key)), None)


def is_decoder(model: Any) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return model.config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not model.config.is_encoder_decoder


def resolve(options: PoolingOptions, model: Any, checkpoint: Path | None) -> str | None:
    """The pooling mode for `model` loaded from `checkpoint`; None: keep the model class's own head."""
    if options.pooling != "auto":
        return options.pooling
    found = sentence_pooling(checkpoint) if checkpoint is not None else None
    if found or options.head == "linear":
        return found
    # an MLP on what the class's own head would read
    return "last" if is_decoder(model) else "pooler" if _pooler(model) is not None else "cls"


def settings(config: Any) -> dict[str, Any] | None:
    """The head a saved model carries (from its config.json), or None for the class's own head."""
    mode = getattr(config, "lmtune_pooling", None)
    if mode is None:
        return None
    return {"pooling": mode, "head": config.lmtune_head, "head_hidden": config.lmtune_head_hidden,
            "head_dropout": config.lmtune_head_dropout}


def shape(model: Any, options: PoolingOptions, restored: dict[str, Any] | None, checkpoint: Path | None,
          weights: Path | None) -> None:
    """Give a freshly loaded `model` its head. A model lmtune saved gets its own head back (weights from `weights`
    or `checkpoint`); `restored` (a saved run's settings) heads a pretrained backbone whose adapter brings the
    weights; else the configured one (`auto` reads `checkpoint`, the pretrained folder)."""
    saved = settings(model.config)
    if saved is not None or restored is not None:
        attach(model, saved or restored)
        source = weights or checkpoint
        if saved is not None and source is not None:
            load_head(model, source)
        return
    mode = resolve(options, model, checkpoint)
    if mode is None:
        return
    if options.pooling == "auto":
        why = ("the checkpoint's sentence-embedding pooling" if checkpoint and sentence_pooling(checkpoint)
               else f"what the model's own head reads, into an {options.head} head")
        log.info("task.pooling auto: %s (%s)", mode, why)
    attach(model, {"pooling": mode, "head": options.head, "head_hidden": options.head_hidden,
                   "head_dropout": options.head_dropout})


class Head(torch.nn.Module):
    """Dropout + linear, or dropout + linear + GELU + dropout + linear."""

    def __init__(self, width: int, outputs: int, kind: str, hidden: int | None, dropout: float) -> None:
        super().__init__()
        if kind == "linear":
            layers: list[torch.nn.Module] = [torch.nn.Dropout(dropout), torch.nn.Linear(width, outputs)]
        else:
            hidden = hidden or width
            layers = [torch.nn.Dropout(dropout), torch.nn.Linear(width, hidden), torch.nn.GELU(),
                      torch.nn.Dropout(dropout), torch.nn.Linear(hidden, outputs)]
        self.net = torch.nn.Sequential(*layers)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(pooled)


def pool(mode: str, hidden: torch.Tensor, mask: torch.Tensor, pooler_output: torch.Tensor | None) -> torch.Tensor:
    """[batch, tokens, width] -> [batch, width] over the real tokens (mask 1), whichever side the padding is on."""
    if mode == "pooler":
        return pooler_output
    if mode == "cls":
        return hidden[:, 0]
    real = mask.to(hidden.dtype).unsqueeze(-1)
    if mode == "mean":
        return (hidden * real).sum(1) / real.sum(1).clamp(min=1)
    if mode == "max":
        return hidden.masked_fill(real == 0, torch.finfo(hidden.dtype).min).max(1).values
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * mask.bool()).argmax(1)  # the last real token (left or right padding)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def _pooler(model: Any) -> Any:
    pooler = getattr(model.base_model, "pooler", None)
    return pooler if isinstance(pooler, torch.nn.Module) else None


def attach(model: Any, spec: dict[str, Any]) -> None:
    """Replace the transformers class's head of `model` (a ...ForSequenceClassification) with lmtune's, as `spec`
    (pooling, head, head_hidden, head_dropout) says; its settings go into the model's config."""
    mode = spec["pooling"]
    if mode == "pooler" and _pooler(model) is None:
        raise ValueError(f"task.pooling: pooler: this {type(model).__name__} has no pooler; use cls, mean, max or last")
    base = model.base_model
    for name, child in list(model.named_children()):  # the class's own head goes: nothing unused stays
        if child is not base and any(True for _ in child.parameters()):
            delattr(model, name)
    if mode != "pooler" and _pooler(model) is not None:
        base.pooler = None  # (BERT-like models skip a missing pooler)
    model.add_module(PREFIX, Head(model.config.hidden_size, model.config.num_labels, spec["head"],
                                  spec["head_hidden"], spec["head_dropout"]))
    model.forward = types.MethodType(_forward, model)  # bound: a deep copy binds to the copy
    config = model.config
    config.lmtune_pooling, config.lmtune_head = mode, spec["head"]
    config.lmtune_head_hidden, config.lmtune_head_dropout = spec["head_hidden"], spec["head_dropout"]


def load_head(model: Any, folder: Path) -> None:
    """The trained head's weights from a saved model `folder` (its safetensors files, keys `lmtune_head.*`)."""
    from safetensors import safe_open

    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            state.update({k[len(PREFIX) + 1:]: f.get_tensor(k) for k in f.keys() if k.startswith(PREFIX + ".")})
    if not state:
        raise ValueError(f"{folder}: its config.json names an lmtune head ({model.config.lmtune_pooling} pooling) but "
                         f"its weights hold no {PREFIX}.* tensors: the folder is damaged")
    getattr(model, PREFIX).load_state_dict(state)


def _forward(self: Any, input_ids: Any = None, attention_mask: Any = None, labels: Any = None, **kwargs: Any) -> Any:
    """The model's forward with lmtune's head: the backbone, the pooling, the head, the class's own loss."""
    from transformers.modeling_outputs import SequenceClassifierOutput

    passed = {k: v for k, v in kwargs.items()
              if v is not None and k not in ("return_dict", "output_attentions", "output_hidden_states")}
    if attention_mask is None:
        reference = input_ids if input_ids is not None else passed["inputs_embeds"][..., 0]
        attention_mask = torch.ones(reference.shape[:2], dtype=torch.long, device=reference.device)
    out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, **passed)
    pooled = pool(self.config.lmtune_pooling, out.last_hidden_state, attention_mask,
                  getattr(out, "pooler_output", None))
    logits = getattr(self, PREFIX)(pooled)
    loss = None
    if labels is not None:
        problem, n = self.config.problem_type, self.config.num_labels
        if problem == "regression":
            loss = torch.nn.functional.mse_loss(logits.squeeze(-1) if n == 1 else logits,
                                                labels.to(logits.dtype).view(-1) if n == 1 else labels.to(logits.dtype))
        elif problem == "multi_label_classification":
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        else:
            loss = torch.nn.functional.cross_entropy(logits.view(-1, n), labels.view(-1))
    return SequenceClassifierOutput(loss=loss, logits=logits)


class PooledTask:
    """For a task with `PoolingOptions` (mixed in before Task): its head shaped and restored as configured."""

    options: Any
    restored_head: dict[str, Any] | None = None  # a finished run's head settings (see `restore`)

    def shape_model(self, model: Any, checkpoint: Path | None = None, weights: Path | None = None) -> None:
        shape(model, self.options, self.restored_head, checkpoint, weights)

    def restore(self, config: Any) -> None:
        self.restored_head = settings(config)
