"""Keep data tests off the user's caches: lmtune's and datasets' caches go to a per-session temp dir."""

import datasets
import pytest


@pytest.fixture(scope="session")
def _session_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _isolated_caches(monkeypatch, _session_cache):
    monkeypatch.setenv("LMTUNE_CACHE", str(_session_cache / "lmtune"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # datasets reads this module attribute when a builder is created, not only at import.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", _session_cache / "hf")
