#!/usr/bin/env bash
# Quickstart tests: set up, then run the whole suite (real processes on 127.0.0.1; ~30 minutes on 2 cores).
# Arguments go to pytest: `bash tests/run.sh -m "not swarm"` is the fast tier.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(bash "$ROOT/examples/setup.sh" | tail -n 1)"
cd "$ROOT"
exec "$VENV/bin/python" -m pytest tests "$@"
