"""Models from the Hugging Face Hub: a Hub id (`org/name`, `org/name@revision`) fetched once into the standard HF
cache with only the files loading needs, its revision pinned to the commit it names."""

from __future__ import annotations

import re
from pathlib import Path

from lmtune.errors import ModelError

# What loading a model and its tokenizer reads; pickled weights only where the user allows them.
MODEL_FILES = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
               "vocab.txt", "vocab.json", "merges.txt", "*.model", "chat_template.jinja", "chat_template.json",
               "preprocessor_config.json"]
PICKLE_FILES = ["*.bin", "*.bin.index.json"]
_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*(?:/[\w.-]+)?)(?:@(?P<revision>[\w./-]+))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def parse_id(name: str) -> tuple[str, str | None] | None:
    """(repository, revision or None) for a name written as a Hub id, else None."""
    match = _ID.match(name)
    if match is None or ".." in name or name.endswith((".", "/")):
        return None
    return match["repo"], match["revision"]


def fetch_model(name: str, allow_pickle: bool = False) -> Path:
    """The cached snapshot folder of the Hub model `name`, downloaded first where it is not cached (and the Hub can
    be reached); `HF_HUB_OFFLINE=1` uses the cache alone."""
    parsed = parse_id(name)
    if parsed is None:
        raise ModelError(f"model {name!r} is neither a built-in name, a local folder nor a Hub id (org/name[@revision])")
    repo, revision = parsed
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    patterns = MODEL_FILES + (PICKLE_FILES if allow_pickle else [])
    try:
        folder = Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except (RepositoryNotFoundError, GatedRepoError) as err:
        raise ModelError(f"model {name!r}: no local folder of that name, and the Hub has no repository {repo!r} you "
                         f"can read ({type(err).__name__}); check the id, or log in for a gated one") from None
    except RevisionNotFoundError:
        raise ModelError(f"model {name!r}: the Hub repository {repo!r} has no revision {revision!r}") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        offline = "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise ModelError(f"model {name!r}: no local folder of that name, and the Hub model {repo!r}"
                         f"{f' at {revision!r}' if revision else ''} is not in the Hugging Face cache "
                         f"({constants.HF_HUB_CACHE}) while {offline} ({type(err).__name__}). Fetch it once with "
                         f"network access (`hf download {repo}`, or any lmtune command without HF_HUB_OFFLINE=1), "
                         "or give a local folder") from None
    if not (folder / "config.json").is_file():
        raise ModelError(f"model {name!r}: the Hub repository {repo!r} has no config.json (not a transformers model)")
    if not any(folder.glob("*.safetensors")) and not (allow_pickle and any(folder.glob("*.bin"))):
        raise ModelError(f"model {name!r} holds no safetensors weights"
                         + ("" if allow_pickle else " (only pickled .bin ones, perhaps, which can run code when "
                            "loaded: set model.allow_pickle=true if you trust them)"))
    return folder


def pinned(name: str, allow_pickle: bool = False) -> str:
    """A Hub id with its revision replaced by the commit it names now (`org/name@<commit>`), so that a saved config
    repeats the run exactly; any other name as it is."""
    parsed = parse_id(name)
    if parsed is None or (parsed[1] and _COMMIT.match(parsed[1])):
        return name
    return f"{parsed[0]}@{fetch_model(name, allow_pickle).name}"  # the snapshot folder is named by its commit
