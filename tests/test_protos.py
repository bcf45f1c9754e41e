"""The checked-in gRPC code is exactly what protoc generates from protos/coordinator.proto."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT

GENERATED = ("coordinator_pb2.py", "coordinator_pb2_grpc.py", "coordinator_pb2.pyi")
REGENERATE = (
    "python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. protos/coordinator.proto"
)


def test_generated_code_matches_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    result = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", f"--python_out={tmp_path}",
         f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}", "protos/coordinator.proto"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, f"protoc failed:\n{result.stdout}\n{result.stderr}"
    stale = [
        name for name in GENERATED
        if (tmp_path / "protos" / name).read_bytes() != (ROOT / "protos" / name).read_bytes()
    ]
    assert not stale, (
        f"protos/{', protos/'.join(stale)} differ from what protos/coordinator.proto generates; "
        f"regenerate from the repo root with:\n  {REGENERATE}"
    )
