#!/usr/bin/env bash
# The main job: prepare data, train B-LeNet (lenet_mnist.py:tuned) and report
# its per-exit accuracy. Rerunning resumes training from the last checkpoint.
#   bash scripts/main.sh [workdir]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
WORKDIR="${1:-workdirs/lenet_mnist_tuned}"
python -m experiments.train --config=experiments/configs/lenet_mnist.py:tuned \
  --workdir="$WORKDIR"
