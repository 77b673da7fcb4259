# Sourced by the call scripts from the repository root on the GPU host; WHEELS names the wheels to install.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
B=${BUNDLE:-$PWD/.carry}
echo "PYTHONDONTWRITEBYTECODE=${PYTHONDONTWRITEBYTECODE-unset}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $WHEELS || exit 1
export PYTHONPATH=/tmp/site:$B/tree/benchmarks/offline:$B/tree/src
python3 -m compileall -q -j 16 /tmp/site "$B/tree/src" >/dev/null 2>&1
python3 -c "import torch, transformers, datasets, pydantic, pyarrow, peft, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'datasets', datasets.__version__, 'pyarrow', pyarrow.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
cd "$B/tree"
