#!/usr/bin/env bash
# One GPU, one go (about 10 minutes on an H200): data, Step A, Step B, diagnose, Step C, report.json.
# Needs only torch, transformers, numpy, pyarrow, pillow and pyyaml (no Ray, MLflow, Optuna, OmegaConf).
#   bash benchmarks/gpu/run.sh OUT [extra flags of benchmarks/gpu/run.py]
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: run.sh OUT [flags]}; shift
nvidia-smi -L 2>/dev/null || echo "no nvidia-smi: running on $(nproc) CPU cores"
PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 python3 benchmarks/gpu/run.py --out "$out" "$@" 2>&1 | tee "$out.log"
