"""Reading what a config is made of: YAML files (alias bombs refused), dotted overrides, and messages that show
values bounded and name the closest valid key."""

from __future__ import annotations

import difflib
import logging
import reprlib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from lmtune.errors import ConfigError

_SHOWN = reprlib.Repr()  # Python 3.11's Repr takes no keyword arguments
_SHOWN.maxlevel, _SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlong = 3, 60, 60, 40
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = _SHOWN.maxset = _SHOWN.maxfrozenset = 6


def shown(value: Any) -> str:
    """A config value as a message shows it: its repr cut to a few items, levels and characters (a value can be
    huge: a long list, a YAML alias bomb)."""
    try:
        text = _SHOWN.repr(value)
    except Exception:  # an int too long to print, a broken __repr__
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 200 else text[:197] + "..."


def _clip(text: str, limit: int = 200) -> str:
    """A message part that holds user text (a key, a YAML error) cut to `limit` characters."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


# How many values YAML aliases (`*name`) may add to a document once written out: an alias bomb (nine anchors, each
# nine of the one before) stays a few hundred bytes and a few dozen objects, and expands to 9**9 values that a message
# or pydantic would walk. A text of 100 characters or more counts one value per 100 characters.
MAX_ALIAS_GROWTH = 100_000
_CONTAINERS = (dict, list, tuple, set, frozenset)


def alias_growth_exceeds(value: Any, limit: int = MAX_ALIAS_GROWTH) -> bool:
    """Whether the parts of `value` (a loaded YAML document, or a dict) that occur more than once add over `limit`
    values when written out, or a part contains itself. Each distinct part is walked once (its written-out size
    computed from its children's): nothing is expanded."""
    sizes: dict[int, int] = {}  # id of a container -> its size written out
    open_: set[int] = set()  # containers on the current path: one met again there contains itself
    texts: set[int] = set()  # long texts met already
    literal = 0  # the size of the document as written, each repeated part counting once

    def weight(item: Any) -> int:
        return 1 + len(item) // 100 if isinstance(item, (str, bytes)) else 1

    def children(item: Any) -> Any:
        return [*item.keys(), *item.values()] if isinstance(item, dict) else item

    if not isinstance(value, _CONTAINERS):
        return False
    stack: list[tuple[Any, bool]] = [(value, False)]
    while stack:
        item, done = stack.pop()
        if not done:
            if id(item) in sizes:
                continue
            if id(item) in open_:
                return True
            open_.add(id(item))
            stack.append((item, True))
            for child in children(item):
                if isinstance(child, _CONTAINERS) and id(child) not in sizes:
                    if id(child) in open_:
                        return True
                    stack.append((child, False))
            continue
        open_.discard(id(item))
        size = written = 1
        for child in children(item):
            if isinstance(child, _CONTAINERS):
                size += sizes[id(child)]
            else:
                size += weight(child)
                long_text = isinstance(child, (str, bytes)) and len(child) >= 100
                written += 1 if long_text and id(child) in texts else weight(child)
                if long_text:
                    texts.add(id(child))
        sizes[id(item)] = size
        literal += written
    return sizes[id(value)] - literal > limit


def _alias_growth_problem(parts: str = "its YAML aliases (*name)") -> str:
    return (f"{parts} expand to more than {MAX_ALIAS_GROWTH:,} values (an alias bomb, or an anchor that contains "
            "itself); refused: write the values out")


def read_yaml(path: Path) -> Any:
    """A YAML file's document; a file that is not YAML, or whose aliases expand past MAX_ALIAS_GROWTH values, is a
    ConfigError naming it."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start + 1})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {_clip(str(err), 600)}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None
    except ValueError as err:  # a value YAML reads but Python cannot hold: a 5,000-digit integer, month 13
        raise ConfigError(f"{path}: not valid YAML: {_clip(str(err))}") from None
    if alias_growth_exceeds(data):
        raise ConfigError(f"{path}: {_alias_growth_problem()}")
    return data


def parse_value(text: str) -> Any:
    """A command-line value: numbers as numbers (also `5e-4`, which YAML 1.1 reads as a string), else YAML."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"value {shown(text)}: not valid YAML ({_clip(problem)})") from None
    except (RecursionError, ValueError) as err:
        raise ConfigError(f"value {shown(text)}: not valid YAML "
                          f"({'nested too deeply' if isinstance(err, RecursionError) else _clip(str(err))})") from None
    if alias_growth_exceeds(value):
        raise ConfigError(f"value {shown(text)}: {_alias_growth_problem()}")
    return value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {shown(item)}: expected section.key=value, e.g. train.lr=3e-5")
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {shown(item)}: {shown(part)} is a value, not a section")
            node = child
        try:
            node[parts[-1]] = parse_value(value)
        except ConfigError as err:
            raise ConfigError(f"override {shown(item)}: {str(err).removeprefix(f'value {shown(value)}: ')}") from None
    return raw


# Names other tools (Trainer arguments, peft's LoraConfig) give our keys: suggested before spelling neighbours.
ALIASES = {"rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "learning_rate": "lr",
           "num_train_epochs": "epochs", "num_epochs": "epochs", "per_device_train_batch_size": "batch_size",
           "gradient_accumulation_steps": "grad_accum", "max_seq_length": "max_length",
           "model_name_or_path": "name"}


def _closest(name: str, choices: list[str]) -> str:
    match = [ALIASES[name]] if ALIASES.get(name) in choices else difflib.get_close_matches(name, choices, n=1,
                                                                                            cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else f"; valid keys: {', '.join(sorted(choices))}"


def unknown_metric(option: str, metric: str, names: list[str], task: str) -> str:
    """The message for an `option` (e.g. eval.metric) naming no metric of `task` (e.g. "the ner task"): the nearest
    name, else all of them."""
    near = difflib.get_close_matches(metric, names, n=1, cutoff=0.5)
    return (f"{option} {shown(metric)} is not a metric of {task}"
            + (f"; did you mean {near[0]!r}?" if near else f" (its metrics: {', '.join(names)})"))


def _fields_at(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> list[str]:
    for part in loc:
        if model is None:
            return []
        field = model.model_fields.get(str(part))
        model = field.annotation if field and isinstance(field.annotation, type) else None
    return list(model.model_fields) if model is not None and issubclass(model, BaseModel) else []


def _format_errors(err: ValidationError, prefix: tuple[str, ...], model: type[BaseModel]) -> list[str]:
    lines = []
    for e in err.errors():
        loc = prefix + tuple(str(p) for p in e["loc"])
        where = _clip(".".join(loc)) or "config"  # a key can be any text of the file
        if e["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key{_closest(loc[-1], _fields_at(model, e['loc'][:-1]))}")
        elif e["type"] == "value_error":
            lines.append(_clip(str(e["ctx"]["error"]) if "ctx" in e else e["msg"], 2000))
        else:
            got = e.get("input")
            value = "" if isinstance(got, dict) else f" (got {shown(got)})"
            lines.append(f"{where}: {e['msg']}{value}")
    return lines


def override(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted overrides to a raw config dict (in place), as `load_config` does."""
    return apply_overrides(_switch_sections(raw, overrides), overrides)


def _switch_sections(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """An override naming another method (or task) starts that section afresh: the file's options were
    written for the method it named and mostly do not exist on another one."""
    for section in ("method", "task"):
        for item in overrides:
            key, _, value = item.partition("=")
            current = raw.get(section)
            name = current.get("name") if isinstance(current, dict) else current
            if key.strip() != f"{section}.name" or name is None:
                continue
            try:
                given = parse_value(value)
            except ConfigError:
                continue  # apply_overrides says so, naming the override
            if str(given) != str(name):
                logging.getLogger("lmtune").info(f"{section}.name={_clip(value)} replaces the config's {section} "
                                                 f"section ({_clip(str(name))})")
                raw[section] = {}
    return raw


def _validate_registered(raw: Any, section: str, table: dict[str, Any], default: str) -> tuple[Any, list[str]]:
    if raw is not None and not isinstance(raw, (str, dict)):
        return None, [f"{section}: give a {section} name or a mapping with `name` (got {shown(raw)})"]
    raw = {"name": raw} if isinstance(raw, str) else dict(raw or {})
    raw.setdefault("name", default)
    name = raw["name"]
    if not isinstance(name, str):  # a list is no key of the table (it raised TypeError)
        return None, [f"{section}.name: give a {section} name (got {shown(name)})"]
    if name not in table:
        return None, [f"{section}.name: unknown {section} {shown(name)}{_closest(name, list(table))}"
                      .replace("valid keys", f"known {section}s")]
    options = table[name].Options
    try:
        return options.model_validate(raw), []
    except ValidationError as err:
        return None, _format_errors(err, (section,), options)
