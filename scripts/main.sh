#!/usr/bin/env bash
# The main job: prepare data, train B-LeNet (lenet_mnist.py:tuned), cache its exit
# outputs, choose thresholds on validation and benchmark early exit against the full
# network on test, printing the Table-1-style table. Rerunning resumes training from
# the last checkpoint.
#   bash scripts/main.sh [workdir] [extra experiments.benchmark flags]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
WORKDIR="${1:-workdirs/lenet_mnist_tuned}"
shift || true
python -m experiments.train --config=experiments/configs/lenet_mnist.py:tuned \
  --workdir="$WORKDIR"
python -m experiments.evaluate --workdir="$WORKDIR"
# Batch 1 on one core (the lowest latency for baseline and cascade alike), then the
# batched sizes on every core; the second run prints the table of both.
python -m experiments.benchmark --workdir="$WORKDIR" --batch_sizes=1 --cores=1 "$@"
python -m experiments.benchmark --workdir="$WORKDIR" --batch_sizes=256,2048 "$@"
