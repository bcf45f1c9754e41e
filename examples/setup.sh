#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install potluck into it, with the test and postgresql (psycopg) extras.
# torch is installed only when missing: a bare "torch" requirement would pull a multi-GB CUDA build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${POTLUCK_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "error: potluck needs Python >= 3.11 (set PYTHON=python3.11)" >&2; exit 2; }
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -c 'import torch' 2>/dev/null || "$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet -e "$ROOT[test,postgresql]"
echo "$VENV"
