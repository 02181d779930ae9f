#!/usr/bin/env bash
# GPU check of the distillation trainer on one CUDA GPU, at most 8 minutes (see benchmarks/gpu_check.py).
#
#   bash benchmarks/gpu_check.sh            # full sizes: BERT-base -> DistilBERT, bf16, seq 512
#   bash benchmarks/gpu_check.sh --smoke    # tiny sizes, also on CPU (GPU_CHECK_SMOKE=1 does the same)
#
# Needs torch and transformers. Missing accelerate / datasets / evaluate are installed, without the internet, from
# the wheels folder $WHEELS (default: wheels/ at the repository root) when it exists; only accelerate is needed to
# run. Figures go to stdout and, when $OUT is set, to $OUT/gpu_check.txt.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PYTHON="${PYTHON:-python}"
WHEELS="${WHEELS:-$REPO/wheels}"
LIMIT_S="${GPU_CHECK_LIMIT_S:-480}"

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# One GPU: with several visible, Trainer would split each pre-built batch with DataParallel.
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"

missing="$("$PYTHON" - <<'PY'
import importlib.util
print(" ".join(m for m in ("accelerate", "datasets", "evaluate") if importlib.util.find_spec(m) is None))
PY
)"
if [ -n "$missing" ]; then
    if [ -d "$WHEELS" ]; then
        echo "installing from $WHEELS: $missing"
        for pkg in $missing; do
            "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" "$pkg" \
                || echo "warning: could not install $pkg from $WHEELS (only accelerate is required here)"
        done
    else
        echo "note: not installed: $missing; no wheels folder at $WHEELS (only accelerate is required here)"
    fi
fi
if ! "$PYTHON" -c "import accelerate" 2>/dev/null; then
    echo "error: transformers.Trainer needs accelerate; put its wheel in $WHEELS (pip download accelerate --no-deps -d wheels)" >&2
    exit 2
fi

# SIGINT first so Python can unwind; the partial output file is kept either way.
exec timeout --signal=INT --kill-after=15 "$LIMIT_S" "$PYTHON" benchmarks/gpu_check.py "$@"
