"""Regenerate the Python code for protos/ into client/ (never edit its output by hand).

Typed stubs come from mypy-protobuf (`*_pb2.pyi`, `*_pb2_grpc.pyi`). Run after
changing a .proto; tests/unit/test_generated_code.py fails when the committed
output is stale.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
DEFAULT_OUT = ROOT / "client"


def _plugin(name: str) -> str:
    """Find a mypy-protobuf plugin next to this interpreter, then on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found: pip install mypy-protobuf")
    return found


def generate(out_dir: Path = DEFAULT_OUT) -> list[Path]:
    """Compile every .proto under protos/ with typed stubs; return the written files."""
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *(str(p) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    written = []
    for proto in protos:
        relative = proto.parent.relative_to(PROTO_ROOT)
        for depth in range(1, len(relative.parts) + 1):
            init = out_dir.joinpath(*relative.parts[:depth], "__init__.py")
            init.touch()
            written.append(init)
        stem = out_dir / relative / proto.stem
        written += [
            Path(f"{stem}{suffix}") for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
        ]
    return sorted(set(written))


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    for path in generate(out):
        print(path.relative_to(out))
