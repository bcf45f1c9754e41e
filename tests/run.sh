#!/usr/bin/env bash
# Quickstart tests: set up, then run the whole suite (real processes on 127.0.0.1, a few minutes).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(bash "$ROOT/examples/setup.sh" | tail -n 1)"
cd "$ROOT"
exec "$VENV/bin/python" -m pytest tests "$@"
