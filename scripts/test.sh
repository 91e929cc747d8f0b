#!/usr/bin/env bash
# The test suite, with all set-up, in two legs, each in its own virtualenv:
#   lowest  the whole suite on the lowest supported versions (python3,
#           scripts/constraints-lowest.txt, extras test,prepare,onednn), in .venv-lowest;
#   newest  `pytest -m newest` on the newest JAX that setup.cfg admits (Python >= 3.12,
#           unconstrained, extras test,onednn: no TensorFlow), in .venv-newest.
# Usage: bash scripts/test.sh [pytest args for the lowest leg]
#   BNET_LEGS=lowest|newest|both (default both) picks the legs; BNET_NEWEST_LEG=0
#   drops the newest leg where no Python >= 3.12 is installed; BNET_TEST_WORKERS
#   (default 2) test processes per leg, each taking whole test files (pytest-xdist;
#   0: one process). Exits nonzero if a leg fails. Delete .venv-newest to pick up a
#   newer JAX release.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

LEGS="${BNET_LEGS:-both}"
WORKERS="${BNET_TEST_WORKERS:-2}"
[[ "$WORKERS" =~ ^[0-9]+$ ]] || { echo "BNET_TEST_WORKERS must be a whole number, not '$WORKERS'" >&2; exit 2; }
case "$LEGS" in
  lowest | newest | both) ;;
  *) echo "BNET_LEGS must be lowest, newest or both, not '$LEGS'" >&2; exit 2 ;;
esac
if [ "${BNET_NEWEST_LEG:-1}" = 0 ]; then
  [ "$LEGS" = newest ] && { echo "BNET_NEWEST_LEG=0 with BNET_LEGS=newest: no leg to run" >&2; exit 2; }
  LEGS=lowest
fi

# Prints a Python >= 3.12 interpreter: python3.12 / python3.13 / python3 on PATH if it
# runs (a pyenv shim of a version that is not selected does not), else pyenv's 3.12.x,
# else its newest 3.1x.
newest_python() {
  local c v
  for c in python3.12 python3.13 python3; do
    if command -v "$c" >/dev/null \
        && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$c"; return
    fi
  done
  command -v pyenv >/dev/null || return 1
  for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.12\.[0-9]+$' | sort -V -r) \
      $(pyenv versions --bare 2>/dev/null | grep -E '^3\.1[3-9]\.[0-9]+$' | sort -V -r); do
    c="$(pyenv root)/versions/$v/bin/python3"
    if [ -x "$c" ] && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      echo "$c"; return
    fi
  done
  return 1
}

# Runs one leg in a subshell: NAME VENV PYTHON CONSTRAINTS EXTRAS [pytest args]; prints
# the JAX family's versions and the leg's seconds; returns the leg's exit status.
run_leg() {
  local name="$1" start=$SECONDS rc
  set +e
  (
    set -euo pipefail
    export BNET_VENV="$2" BNET_PYTHON="$3" BNET_CONSTRAINTS="$4" BNET_EXTRAS="$5"
    shift 5
    # shellcheck disable=SC1091
    source scripts/setup.sh
    echo "== leg $name: $(python --version), $BNET_VENV"
    python -m pip freeze | grep -iE "^(jax|jaxlib|flax|optax|orbax)"
    python -m pytest -q -p no:cacheprovider -n "$WORKERS" --dist loadfile "$@"
  )
  rc=$?
  set -e
  echo "== leg $name: $((SECONDS - start)) s, exit status $rc"
  return "$rc"
}

PY_NEWEST=""
if [ "$LEGS" != lowest ]; then
  if ! PY_NEWEST="$(newest_python)"; then
    echo "No Python >= 3.12 found for the newest-JAX leg: install Python 3.12 (python3.12 on" \
         "PATH, or pyenv install 3.12), or set BNET_NEWEST_LEG=0 to skip that leg." >&2
    exit 2
  fi
fi

FAILED=()
if [ "$LEGS" != newest ]; then
  run_leg lowest .venv-lowest python3 "$REPO/scripts/constraints-lowest.txt" test,prepare,onednn \
    "$@" || FAILED+=(lowest)
fi
if [ "$LEGS" != lowest ]; then
  run_leg newest .venv-newest "$PY_NEWEST" "" test,onednn -m newest || FAILED+=(newest)
fi
if [ "${#FAILED[@]}" -gt 0 ]; then
  echo "== failed: ${FAILED[*]}" >&2
  exit 1
fi
