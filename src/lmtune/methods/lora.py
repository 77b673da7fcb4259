"""LoRA and its peft relatives (DoRA, IA3, prompt tuning): small adapters train, the new head with them."""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from lmtune.methods.stage import Method, ParamGroup, Stage, TaskInfo, output_layer
from lmtune.registry import register_method

log = logging.getLogger("lmtune")

# peft needs to know how the model's outputs are produced; read off the model class, not the task.
_TASK_TYPES = {"ForSequenceClassification": "SEQ_CLS", "ForTokenClassification": "TOKEN_CLS",
               "ForQuestionAnswering": "QUESTION_ANS", "ForCausalLM": "CAUSAL_LM"}


class LoraOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    name: Literal["lora"] = "lora"
    """Low-rank adapters (peft) on a frozen backbone; the new head trains fully and is saved with them."""
    variant: Literal["lora", "dora", "ia3", "prompt_tuning"] = "lora"
    """lora; dora (weight-decomposed LoRA); ia3 (learned rescaling vectors); prompt_tuning (soft prompt)."""
    r: int = 8
    """LoRA/DoRA rank."""
    alpha: int = 16
    """LoRA/DoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA/DoRA input (peft's default, 0: each adapter would otherwise keep its own dropped
    copy of its input: slower and more memory, for no gain measured; benchmarks/RESULTS.md)."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Modules that get adapters: all linear layers of the backbone, or a list of module names."""
    num_virtual_tokens: int = 20
    """prompt_tuning: length of the learned soft prompt."""
    lr: float | None = None
    """Learning rate of the adapters; default: train.lr (adapters usually want about 10x full fine-tuning's)."""
    head_lr: float | None = None
    """Learning rate of the head; default: the adapters'."""
    train_output_layer: bool = False
    """Also train a decoder's untied pretrained output layer, as a full fp32 copy saved with the adapters (a
    Llama-3-8B's: 525 M parameters, ~8 GB more with gradients and AdamW moments). Needed where the base checkpoint
    never trained the output rows of tokens the data teaches, e.g. a base model's chat end-of-turn token (the run
    warns when it finds such rows); by default the output layer stays frozen, as the adapters' backbone."""
    quantize: Literal["4bit"] | None = None
    """4bit: QLoRA, the frozen backbone held in 4-bit NF4 (bitsandbytes, double quantisation, bf16 compute) while
    the adapters train in full precision; CUDA only. Predict, eval and serve load the base in full precision;
    `export` merges the adapters into bf16 weights."""


def _task_type(model: Any) -> str:
    name = type(model).__name__
    for suffix, task_type in _TASK_TYPES.items():
        if name.endswith(suffix):
            return task_type
    raise ValueError(f"method 'lora' does not know how to adapt a {name}")


def _head_modules(model: Any, info: TaskInfo, train_output_layer: bool = False) -> list[str]:
    """Modules owning the head's weights (and any weight the checkpoint lacked): trained and saved whole. Not a
    decoder's pretrained output layer unless `train_output_layer`: it is part of the language model the adapters
    adapt (an untied one trained whole would be a Llama-3-8B's 525 M parameters with their fp32 gradients and AdamW
    moments, 8 GB more)."""
    modules = dict(model.named_modules())
    output = None if train_output_layer else output_layer(model)[0]
    pretrained = {n for n, p in model.named_parameters()
                  if output is not None and any(p is q for q in output.parameters()) and n not in info.new_names}
    owners = {name.rpartition(".")[0] for name in info.head_names if name not in pretrained}
    return sorted(o for o in owners if o in modules)


def _check_output_layer(model: Any, info: TaskInfo, options: LoraOptions) -> None:
    """Refuse train_output_layer where there is no separate output layer; warn where a frozen one has rows the
    checkpoint never trained for tokens the training targets hold (the model could not learn to produce them)."""
    output, tied = output_layer(model)
    if options.train_output_layer and (output is None or tied):
        raise ValueError("method 'lora': method.train_output_layer: this " + type(model).__name__ + " has no separate "
                         "output layer (" + ("it is tied to the input embeddings" if tied else "none") + "); use "
                         "method.name=full to train it")
    save = set(_head_modules(model, info, options.train_output_layer))
    if output is None or any(m is output for name, m in model.named_modules() if name in save):
        return
    if untrained := sorted(set(untrained_output_rows(output)) & set(info.target_ids)):
        log.warning("the training targets hold %d token(s) whose output rows this checkpoint never trained (near "
                    "zero), ids %s%s (a base model's chat end-of-turn token often is one): LoRA keeps the output layer "
                    "frozen, so the model cannot learn to produce them; %s", len(untrained), untrained[:8],
                    " ..." if len(untrained) > 8 else "", "tune with method.name=full" if tied else
                    "set method.train_output_layer=true or tune with method.name=full")


def untrained_output_rows(output: Any) -> list[int]:
    """Token ids whose row of the output layer `output` is near zero (below 1e-3 of the median row's norm): tokens
    the checkpoint never learned to produce (a base model's reserved and chat-template tokens, e.g. Llama-3 base's
    <|eot_id|>)."""
    import torch

    weight = getattr(output, "weight", None)
    if weight is None or weight.device.type == "meta" or weight.dim() != 2 or not weight.is_floating_point():
        return []  # (a model built on the meta device for preflight; 4-bit storage)
    with torch.no_grad():
        norms = torch.linalg.vector_norm(weight, dim=1, dtype=torch.float32)  # no fp32 copy of the whole layer
    return torch.nonzero(norms < 1e-3 * norms.median()).flatten().tolist()


def _unknown_targets(model: Any, targets: list[str]) -> str | None:
    """Target names that match no module the way peft matches them (the full name or its dotted ending): peft
    refuses only when none matches, with a message that names none of them."""
    import torch

    names = [name for name, _ in model.named_modules()]
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if not unknown:
        return None
    linear = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    return (f"method 'lora': method.target_modules {unknown} name no module of this {type(model).__name__}; its "
            f"linear layers are named {linear}")


def peft_config(model: Any, info: TaskInfo, options: LoraOptions) -> Any:
    import peft

    task_type = _task_type(model)
    targets = options.target_modules if isinstance(options.target_modules, list) else None
    if options.variant != "prompt_tuning" and targets and (problem := _unknown_targets(model, targets)):
        raise ValueError(problem)
    _warn_unused(options)
    save = _head_modules(model, info, options.train_output_layer)
    if options.variant == "prompt_tuning":
        return peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=options.num_virtual_tokens,
                                       modules_to_save=save or None)
    if options.variant == "ia3":  # the given modules, else peft's for the architecture (attention and feed-forward)
        from peft.utils import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD

        feedforward = None if targets is None else [t for t in targets if t in FEEDFORWARD.get(
            getattr(model.config, "model_type", ""), [])]
        return peft.IA3Config(task_type=task_type, target_modules=targets, feedforward_modules=feedforward,
                              modules_to_save=save or None)
    return peft.LoraConfig(task_type=task_type, r=options.r, lora_alpha=options.alpha,
                           lora_dropout=options.dropout, target_modules=options.target_modules,
                           exclude_modules=save or None, modules_to_save=save or None,
                           use_dora=options.variant == "dora")


_UNUSED = {"ia3": ("r", "alpha", "dropout"), "prompt_tuning": ("r", "alpha", "dropout", "target_modules"),
           "lora": ("num_virtual_tokens",), "dora": ("num_virtual_tokens",)}
_warned: set[str] = set()


def _warn_unused(options: LoraOptions) -> None:
    """Options set away from their defaults that the chosen variant does not read: said once, not silently dropped."""
    defaults = LoraOptions()
    unused = [f"method.{k}={getattr(options, k)!r}" for k in _UNUSED[options.variant]
              if getattr(options, k) != getattr(defaults, k)]
    message = f"method.variant={options.variant} does not use {', '.join(unused)}: ignored"
    if unused and message not in _warned:
        _warned.add(message)
        log.warning(message)


@register_method("lora")
class Lora(Method):
    Options = LoraOptions

    @staticmethod
    def load_kwargs(options: LoraOptions, device: Any) -> dict[str, Any]:
        """QLoRA: the backbone loaded in 4-bit NF4 straight onto the training GPU."""
        if not options.quantize:
            return {}
        import torch
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.bfloat16)
        return {"quantization_config": quantization, "dtype": torch.bfloat16, "device_map": {"": str(device)}}

    @staticmethod
    def prepare(model: Any, info: TaskInfo, options: LoraOptions) -> Any:
        """Wrap the model with peft adapters (the returned model replaces the original)."""
        import peft
        import torch

        _check_output_layer(model, info, options)
        model = peft.get_peft_model(model, peft_config(model, info, options))
        # QLoRA (a bf16 backbone): what trains (the adapters, a new head's copy) in fp32 for AdamW; the frozen rest
        # stays bf16 (peft's prepare_model_for_kbit_training would make the embeddings and head fp32: +4 GB at 8B).
        for param in model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
        return model

    @staticmethod
    def apply(model: Any, info: TaskInfo, options: LoraOptions) -> list[Stage]:
        # peft has already marked what trains: the adapters and the copies of the head modules.
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        head = [n for n in trainable if ".modules_to_save." in n]
        groups = [ParamGroup([n for n in trainable if n not in head], lr=options.lr),
                  ParamGroup(head, lr=options.head_lr or options.lr)]
        return [Stage(options.variant, [g for g in groups if g.names])]
