"""Config checks that need the model's config.json and tokenizer but no weights and no data: `lmtune validate`
and `train` both run them first, so a config that cannot train is refused early, with the same message."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmtune.config_read import unknown_metric
from lmtune.errors import ConfigError
from lmtune.training.trackers import tracker_problem

if TYPE_CHECKING:
    from lmtune.config import RunConfig
from lmtune.registry import TASKS


@dataclass
class Setup:
    """What the checks loaded, for the caller to reuse: the task, the tokenizer, the model's config, max length."""

    task: Any
    tokenizer: Any
    model_config: Any
    max_length: int


def check_setup(cfg: RunConfig) -> Setup:
    """The task, tokenizer and model config of `cfg`; raises one ConfigError listing every problem of the config
    with them (a ModelError where the model itself cannot be used as configured)."""
    from lmtune import models

    task = TASKS[cfg.task.name](cfg.task, cfg.data)
    folder = models.resolve_model(cfg.model.name, cfg.model.allow_pickle, cfg.model.trust_remote_code)
    models.check_weight_format(folder, cfg.model)
    tokenizer = models.load_tokenizer(cfg.model)
    model_config = models.load_model_config(cfg.model)
    max_length = models.max_length(cfg.model, tokenizer, model_config)
    if cfg.model.dropout is not None:
        models.dropout_overrides(model_config, cfg.model.dropout)
    problems = [task.config_problem(tokenizer, max_length),
                label_smoothing_problem(cfg, task), *general_text_problems(cfg, task, model_config),
                replay_problem(cfg, task), metric_problem(cfg.eval.metric, task, "eval.metric"),
                precision_problem(cfg.train.precision), tracker_problem(cfg.output.report_to),
                calibrate_problem(cfg), class_weights_problem(cfg), quantize_problem(cfg), prompt_tuning_problem(cfg),
                "data.label_column: one column (several are for task.name: regression)"
                if isinstance(cfg.data.label_column, list) and cfg.task.name != "regression" else None]
    problems = [p for p in problems if p] or [method_problem(cfg, task, model_config)]  # builds the model: last
    problems = [p for p in problems if p]
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
    return Setup(task, tokenizer, model_config, max_length)


def calibrate_problem(cfg: RunConfig) -> str | None:
    """eval.calibrate needs single-label classification and validation rows to fit on."""
    if not cfg.eval.calibrate:
        return None
    if cfg.task.name != "classification" or getattr(cfg.task, "multi_label", False):
        return "eval.calibrate: temperature scaling is for classification with one label a text"
    if cfg.data.validation is None and not cfg.data.validation_size:
        return "eval.calibrate: the temperature is fitted on validation rows: give data.validation or " \
               "data.validation_size"
    return None


def method_problem(cfg: RunConfig, task: Any, model_config: Any) -> str | None:
    """A built-in method applied to the model built on the meta device (its structure, no weights, no memory), as
    train applies it after loading the weights: a head-only method on a decoder whose output layer is its
    embeddings, BitFit on a model without biases, LoRA target modules the model lacks are refused before any data
    is read. A model that cannot be built so, and methods registered elsewhere (they may read weight values), are
    left to train."""
    import warnings

    import torch

    from lmtune.methods import METHODS, TaskInfo
    from lmtune.models import head_names

    method = METHODS[cfg.method.name]
    if not method.__module__.startswith("lmtune.methods."):
        return None
    try:
        with torch.device("meta"):
            model = task.auto_class.from_config(model_config, trust_remote_code=cfg.model.trust_remote_code)
    except Exception:  # noqa: BLE001 - e.g. an architecture without this task's head: train says so itself
        return None
    try:
        task.shape_model(model)
    except ValueError as err:  # e.g. task.pooling: pooler on a model without one
        return str(err)
    info = TaskInfo(head_names=head_names(model, []), epochs=cfg.train.epochs)
    try:
        with warnings.catch_warnings():  # peft's wrapping warns as it will again in train
            warnings.simplefilter("ignore")
            model = method.prepare(model, info, cfg.method)
            method.apply(model, info, cfg.method)
    except ValueError as err:  # lmtune's own messages name the method; peft's do not
        return str(err) if str(err).startswith("method ") else f"method {cfg.method.name!r}: {err}"
    return None


def class_weights_problem(cfg: RunConfig) -> str | None:
    if cfg.train.class_weights and cfg.task.name != "classification":
        return f"train.class_weights: for classification; the {cfg.task.name} task has no classes to weigh"
    if cfg.data.sampler == "balanced" and (cfg.task.name != "classification" or getattr(cfg.task, "multi_label",
                                                                                         False)):
        return "data.sampler: balanced is for classification with one label a text"
    return None


def label_smoothing_problem(cfg: RunConfig, task: Any) -> str | None:
    if not cfg.train.label_smoothing or task.cross_entropy_targets:
        return None
    return (f"train.label_smoothing={cfg.train.label_smoothing}: the {cfg.task.name} task "
            f"({'multi-label, ' if getattr(cfg.task, 'multi_label', False) else ''}"
            "not a cross-entropy over classes) cannot smooth its labels; set it to 0")


def prompt_tuning_problem(cfg: RunConfig) -> str | None:
    """Packed rows (causal_lm always, instruct with task.packing) carry a block-diagonal [B, 1, L, L] attention mask,
    which peft's virtual tokens cannot extend (the first step failed: "Tensors must have same number of dimensions")."""
    if getattr(cfg.method, "variant", None) != "prompt_tuning":
        return None
    if cfg.task.name == "ner":  # a label per token: the virtual tokens add outputs that have none
        return ("method.variant=prompt_tuning: the ner task labels every token, and peft's virtual tokens add outputs "
                "no label belongs to; use lora, dora or ia3")
    packed = cfg.task.name == "causal_lm" or (cfg.task.name == "instruct" and getattr(cfg.task, "packing", False))
    if not packed:
        return None
    where = "causal_lm packs documents into rows" if cfg.task.name == "causal_lm" else "task.packing packs chats"
    return (f"method.variant=prompt_tuning: {where}, each attending only to itself, and peft's virtual tokens cannot "
            "join such rows; use lora, dora or ia3" + (", or task.packing=false" if cfg.task.name == "instruct" else ""))


def quantize_problem(cfg: RunConfig) -> str | None:
    """method.quantize (QLoRA) needs bitsandbytes on a CUDA GPU, and an adapter that wraps linear layers."""
    if not getattr(cfg.method, "quantize", None):
        return None
    import importlib.util

    import torch

    if cfg.method.variant not in ("lora", "dora"):
        return f"method.quantize: QLoRA trains LoRA or DoRA adapters, not method.variant={cfg.method.variant}"
    if not torch.cuda.is_available():
        return (f"method.quantize={cfg.method.quantize} (QLoRA) needs a CUDA GPU: bitsandbytes' 4-bit layers run "
                "only there; on this machine train plain LoRA (drop method.quantize)")
    if not torch.cuda.is_bf16_supported():
        return (f"method.quantize={cfg.method.quantize} computes in bf16, which this GPU does not support (Ampere or "
                "newer does); train plain LoRA here (drop method.quantize)")
    if importlib.util.find_spec("bitsandbytes") is None:
        return f"method.quantize={cfg.method.quantize} needs the bitsandbytes package: pip install bitsandbytes"
    return None


def precision_problem(precision: str) -> str | None:
    import torch

    if precision == "fp16" and not torch.cuda.is_available():
        return "train.precision=fp16 needs a GPU; use bf16 or fp32 on the CPU"
    return None


def metric_problem(metric: str | None, task: Any, option: str) -> str | None:
    """`option` (e.g. eval.metric) must name a metric the task reports (the loop would otherwise stop at the first
    evaluation)."""
    if metric is None or metric in task.metric_names:
        return None
    return unknown_metric(option, metric, list(task.metric_names), f"the {task.options.name} task")


def replay_problem(cfg: RunConfig, task: Any) -> str | None:
    if not cfg.data.replay or task.mixes_replay:
        return None
    return (f"data.replay mixes general text into a language model's training; the {cfg.task.name} task would "
            "ignore it: remove data.replay (forgetting mitigations for it: method lp_ft, method.l2sp)")


def general_text_problems(cfg: RunConfig, task: Any, model_config: Any) -> list[str]:
    """The decoder forgetting probes (eval.general_text, eval.general_chat) measure the pretrained model before
    training and the tuned one after: only a causal-LM task on a model saved with its language-modelling head gives
    them a meaning."""
    from lmtune.data import resolve_path
    from lmtune.evaluation.probe import is_causal_lm

    problems = []
    for key, what in (("general_text", "a causal LM's perplexity"), ("general_chat", "a causal LM's reply loss")):
        path = getattr(cfg.eval, key)
        if not path:
            continue
        if getattr(task.auto_class, "__name__", "") != "AutoModelForCausalLM":
            problems.append(f"eval.{key} measures {what}; the {cfg.task.name} task does not train a causal LM: "
                            f"remove eval.{key} (encoders: eval.reference_probe)")
        elif not is_causal_lm(model_config):
            saved = ", ".join(getattr(model_config, "architectures", None) or []) or "no architecture named"
            problems.append(f"eval.{key} measures {what}; model {cfg.model.name} is not saved as one ({saved}; an "
                            f"encoder?): remove eval.{key} or use a decoder")
        file = resolve_path(path)
        if not file.is_file():
            problems.append(f"eval.{key}={path}: " + ("no such file" if not file.exists() else "not a file"))
    return problems
