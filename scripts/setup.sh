#!/usr/bin/env bash
# Create .venv with eco-ray installed (editable). `scripts/setup.sh --test` adds the test dependencies.
#
# torch comes first, chosen for the machine, so that pip never pulls the multi-GB CUDA wheel onto a
# CPU-only machine: with an NVIDIA GPU, PyPI's (CUDA) torch; without one, a CPU build (a local CPU wheel
# where pip's find-links has one, else PyTorch's CPU index). A torch already in .venv is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
TORCH_SPEC=${ECO_TORCH_SPEC:-"torch>=2.5,<2.15"}
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found: installing CUDA torch from PyPI"
    pip install -q "$TORCH_SPEC"
  else
    links=$(pip config get global.find-links 2>/dev/null || true)
    local_cpu=$(ls "$links"/torch-*+cpu-cp311-*.whl 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -n "$links" ] && [ -n "$local_cpu" ]; then
      version=$(basename "$local_cpu" | cut -d- -f2 | cut -d+ -f1)
      echo "setup: no GPU: installing the local CPU torch $version"
      pip install -q "torch==$version"
    else
      echo "setup: no GPU: installing CPU torch from PyTorch's CPU index"
      pip install -q "$TORCH_SPEC" --index-url https://download.pytorch.org/whl/cpu
    fi
  fi
fi
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
pip install -q -e ".${extras}"
python -c "import torch, eco_ray; print(f'setup: eco-ray {eco_ray.__version__}, torch {torch.__version__}, cuda={torch.cuda.is_available()}')"
