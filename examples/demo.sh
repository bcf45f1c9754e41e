#!/usr/bin/env bash
# Quickstart demo: set up, then run a local coordinator plus 2 peers training digits.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(bash "$ROOT/examples/setup.sh" | tail -n 1)"
cd "$ROOT"
exec "$VENV/bin/python" -m examples.demo "$@"
