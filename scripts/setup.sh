#!/usr/bin/env bash
# Idempotent set-up shared by the README's commands: a virtualenv with bnet-jax and
# its extras, Debian's Fashion-MNIST package, and the offline TFDS datasets in
# $TFDS_DATA_DIR (default .tfds/) when local IDX files exist and TensorFlow is there
# to build them. Source it: `source scripts/setup.sh`.
#
# Environment (default in brackets); scripts/test.sh sets them for its two legs:
#   BNET_VENV         the virtualenv's folder [.venv]
#   BNET_PYTHON       the interpreter that creates it, if it does not exist [python3]
#   BNET_CONSTRAINTS  a pip constraints file, e.g. scripts/constraints-lowest.txt [none:
#                     pip takes what setup.cfg allows, the newest in a fresh venv]
#   BNET_EXTRAS       bnet-jax's extras [test,prepare,onednn]; `prepare` brings
#                     TensorFlow, `onednn` oneDNN for faster CPU training (nets.onednn)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

VENV="${BNET_VENV:-.venv}"
EXTRAS="${BNET_EXTRAS:-test,prepare,onednn}"
CONSTRAINTS="${BNET_CONSTRAINTS:-}"
if [ ! -x "$VENV/bin/python" ]; then
  "${BNET_PYTHON:-python3}" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
# Reinstall when setup.cfg is newer than the last install, or the extras or the
# constraints (their contents) differ from the last install's.
WANT="extras=$EXTRAS constraints=${CONSTRAINTS:+$(sha256sum <"$CONSTRAINTS" | cut -c1-16)}"
STAMP="$VENV/.bnet-installed"
if ! python -c "import bnet_jax" 2>/dev/null || [ setup.cfg -nt "$STAMP" ] \
    || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet -e ".[$EXTRAS]" ${CONSTRAINTS:+-c "$CONSTRAINTS"}
  echo "$WANT" >"$STAMP"
fi

# Debian packages: Fashion-MNIST's IDX files, and tcmalloc, which the experiments
# preload (experiments/preload.py; 31% faster training than glibc's malloc).
FASHION_DIR="${BNET_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
APT=()
[ -d "$FASHION_DIR" ] || APT+=(dataset-fashion-mnist)
python -c "import ctypes.util, sys; sys.exit(not ctypes.util.find_library('tcmalloc_minimal'))" \
  || APT+=(libtcmalloc-minimal4)
if [ "${#APT[@]}" -gt 0 ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"
  { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${APT[@]}"; } \
    >/dev/null || echo "note: could not apt-get install ${APT[*]}" >&2
fi

export TFDS_DATA_DIR="${TFDS_DATA_DIR:-$REPO/.tfds}"
MNIST_DIR="${BNET_MNIST_DIR:-$REPO/../shared/datasets/mnist}"
# Offline machines: build the real TFDS datasets from local IDX files, which needs
# TensorFlow (the `prepare` extra); a venv without it reads what is already built.
# With internet and no local files, TFDS downloads them on first use instead.
if python -c "import importlib.util, sys; sys.exit(not importlib.util.find_spec('tensorflow'))"
then
  if [ -d "$MNIST_DIR" ]; then
    python -m experiments.prepare_data --dataset=mnist --from_dir="$MNIST_DIR"
  fi
  if [ -d "$FASHION_DIR" ]; then
    python -m experiments.prepare_data --dataset=fashion_mnist --from_dir="$FASHION_DIR"
  fi
fi
