"""Models and datasets from the Hugging Face Hub: a model id (`org/name`, `org/name@revision`) or a dataset name
(`hf:org/name[@revision][/config]:split`) fetched once into the standard HF cache (a model with only the files loading
needs), its revision pinned to the commit it names."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lmtune.errors import ModelError

# What loading a model and its tokenizer reads; pickled weights only where the user allows them.
MODEL_FILES = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
               "vocab.txt", "vocab.json", "merges.txt", "*.model", "chat_template.jinja", "chat_template.json",
               "preprocessor_config.json", "modules.json", "1_Pooling/config.json"]  # (the last two: task.pooling auto)
PICKLE_FILES = ["*.bin", "*.bin.index.json"]
_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*(?:/[\w.-]+)?)(?:@(?P<revision>[\w./-]+))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def parse_id(name: str) -> tuple[str, str | None] | None:
    """(repository, revision or None) for a name written as a Hub id, else None."""
    match = _ID.match(name)
    if match is None or ".." in name or name.endswith((".", "/")):
        return None
    return match["repo"], match["revision"]


def fetch_model(name: str, allow_pickle: bool = False, trust_remote_code: bool = False) -> Path:
    """The cached snapshot folder of the Hub model `name`, downloaded first where it is not cached (and the Hub can
    be reached); `HF_HUB_OFFLINE=1` uses the cache alone. The model's own code (`*.py`) only with
    `trust_remote_code`."""
    parsed = parse_id(name)
    if parsed is None:
        raise ModelError(f"model {name!r} is neither a built-in name, a local folder nor a Hub id (org/name[@revision])")
    repo, revision = parsed
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    patterns = MODEL_FILES + (PICKLE_FILES if allow_pickle else []) + (["*.py"] if trust_remote_code else [])
    try:
        folder = _snapshot(repo, revision, allow_patterns=patterns)
    except (RepositoryNotFoundError, GatedRepoError) as err:
        raise ModelError(f"model {name!r}: no local folder of that name, and the Hub has no repository {repo!r} you "
                         f"can read ({type(err).__name__}); check the id, or log in for a gated one") from None
    except RevisionNotFoundError:
        raise ModelError(f"model {name!r}: the Hub repository {repo!r} has no revision {revision!r}") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        offline = "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise ModelError(f"model {name!r}: not a built-in name, no local folder of that name, and the Hub model "
                         f"{repo!r}"
                         f"{f' at {revision!r}' if revision else ''} is not in the Hugging Face cache "
                         f"({constants.HF_HUB_CACHE}) while {offline} ({type(err).__name__}). Fetch it once with "
                         f"network access (`hf download {repo}{f' --revision {revision}' if revision else ''}`, or any lmtune "
                         "command without HF_HUB_OFFLINE=1), "
                         "or give a local folder") from None
    if not (folder / "config.json").is_file():
        raise ModelError(f"model {name!r}: the Hub repository {repo!r} has no config.json (not a transformers model)")
    if not any(folder.glob("*.safetensors")) and not (allow_pickle and any(folder.glob("*.bin"))):
        raise ModelError(f"model {name!r} holds no safetensors weights"
                         + ("" if allow_pickle else " (only pickled .bin ones, perhaps, which can run code when "
                            "loaded: set model.allow_pickle=true if you trust them)"))
    return folder


def _snapshot(repo: str, revision: str | None, **kwargs: Any) -> Path:
    """`snapshot_download`, answered from the cache alone where the revision is a commit already cached: a commit
    never changes, and a run resolves its (pinned) model several times (config, tokenizer, weights)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if revision and _COMMIT.match(revision):
        try:
            return Path(snapshot_download(repo, revision=revision, local_files_only=True, **kwargs))
        except LocalEntryNotFoundError:
            pass  # not cached yet (or not wholly): ask the Hub
    return Path(snapshot_download(repo, revision=revision, **kwargs))


def pinned(name: str, allow_pickle: bool = False, trust_remote_code: bool = False) -> str:
    """A Hub id with its revision replaced by the commit it names now (`org/name@<commit>`), so that a saved config
    repeats the run exactly; any other name as it is."""
    parsed = parse_id(name)
    if parsed is None or (parsed[1] and _COMMIT.match(parsed[1])):
        return name
    return f"{parsed[0]}@{fetch_model(name, allow_pickle, trust_remote_code).name}"  # named by its commit


# Datasets: `hf:ORG/NAME[@REVISION][/CONFIG]:SPLIT` wherever a data file may be named.
DATA_PREFIX = "hf:"
_DATA = re.compile(r"^hf:(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[\w.-]+))?(?:/(?P<config>[\w.-]+))?"
                   r":(?P<split>[\w.\-\[\]%:]+)$")


def is_dataset_name(text: str) -> bool:
    return str(text).startswith(DATA_PREFIX)


def parse_dataset_name(text: str) -> tuple[str, str | None, str | None, str]:
    """(repository, revision, config, split) of `hf:ORG/NAME[@REVISION][/CONFIG]:SPLIT`; a DataError otherwise."""
    match = _DATA.match(str(text))
    if match is None:
        from lmtune.errors import DataError

        raise DataError(str(text), "a Hub dataset is named hf:ORG/NAME[@REVISION][/CONFIG]:SPLIT, e.g. "
                                   "hf:stanfordnlp/sst2:train or hf:nyu-mll/glue/sst2:validation")
    return match["repo"], match["revision"], match["config"], match["split"]


def fetch_dataset(text: str) -> Path:
    """The cached snapshot folder of a Hub dataset (downloaded first where not cached and the Hub can be reached)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    from lmtune.errors import DataError

    repo, revision, _, _ = parse_dataset_name(text)
    try:
        return _snapshot(repo, revision, repo_type="dataset")
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as err:
        raise DataError(text, f"the Hub has no dataset {repo!r}{f' at {revision!r}' if revision else ''} you can "
                              f"read ({type(err).__name__})") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        offline = "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise DataError(text, f"the Hub dataset {repo!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
                              f"while {offline} ({type(err).__name__}): fetch it once with network access "
                              f"(`hf download --repo-type dataset {repo}{f' --revision {revision}' if revision else ''}`)"
                              ", or give a local file") from None


def read_dataset(text: str) -> Any:
    """A Hub dataset's split as a `datasets.Dataset`, read with `load_dataset` from its cached snapshot (datasets'
    own lookup of a Hub name does not read the hub cache offline)."""
    import datasets

    from lmtune.errors import DataError

    _, _, config, split = parse_dataset_name(text)
    folder = fetch_dataset(text)
    try:
        return datasets.load_dataset(str(folder), name=config, split=split)
    except ValueError as err:  # an unknown split or config
        raise DataError(text, f"cannot read it from {folder}: {str(err).splitlines()[0][:300]}") from None


def pinned_data(text: str | None) -> str | None:
    """A Hub dataset name with its revision replaced by the commit it names now; any other path as it is."""
    if text is None or not is_dataset_name(text) or Path(text).exists():
        return text
    repo, revision, config, split = parse_dataset_name(text)
    if revision and _COMMIT.match(revision):
        return text
    commit = fetch_dataset(text).name
    return f"hf:{repo}@{commit}{f'/{config}' if config else ''}:{split}"
