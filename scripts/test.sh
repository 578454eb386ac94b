#!/usr/bin/env bash
# Bootstrap (with test dependencies), lint, and run the test suite.
#
#   bash scripts/test.sh [PYTEST ARGS...]
#
# Exits with pytest's exit code, except that "no tests collected" (pytest's exit code 5)
# is a failure: a run that tested nothing must never pass.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/bootstrap.sh --test

echo "==> ruff check ."
.venv/bin/ruff check .

echo "==> pytest $*"
status=0
.venv/bin/python -m pytest "$@" || status=$?

if ((status == 5)); then
    echo "test.sh: error: pytest collected no tests (exit code 5); treating this as a failure" >&2
    exit 1
fi
exit "$status"
