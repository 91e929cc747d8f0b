#!/usr/bin/env bash
# The test suite, with all set-up: bash scripts/test.sh [pytest args]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
python -m pytest -q -p no:cacheprovider "$@"
