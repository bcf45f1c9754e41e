#!/usr/bin/env bash
# Quickstart tests: set up, then run a tier of the suite (real processes on 127.0.0.1).
#   bash tests/run.sh            the full tier, every test: what .ci/run runs (~35 minutes on 2 cores; CI took 31).
#   bash tests/run.sh --fast     the fast tier, for the inner loop: -m "not swarm and not slow", every test that
#                                starts no swarm or server and is not marked slow (~2.5 minutes on 2 cores).
# Other arguments go to pytest: `bash tests/run.sh --fast -x -k ledger`, `bash tests/run.sh -m "not swarm"`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "${1-}" = "--fast" ]; then
  shift
  set -- -m "not swarm and not slow" "$@"
fi
VENV="$(bash "$ROOT/examples/setup.sh" | tail -n 1)"
cd "$ROOT"
exec "$VENV/bin/python" -m pytest tests "$@"
