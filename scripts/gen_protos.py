"""Regenerate the committed stubs in client/tether/v1 from protos/tether/v1.

The one way the generated code is made. CI runs it and fails on any diff:

    python scripts/gen_protos.py && git diff --exit-code client/tether/v1
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "client"
PACKAGE = OUT / "tether" / "v1"


def main() -> int:
    # protoc finds the mypy-protobuf plugins on PATH, next to this interpreter.
    bindir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    for old in PACKAGE.glob("*_pb2*.py*"):
        old.unlink()
    shutil.rmtree(PACKAGE / "__pycache__", ignore_errors=True)
    protos = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "tether" / "v1").glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={OUT}",
        f"--grpc_python_out={OUT}",
        f"--mypy_out={OUT}",
        f"--mypy_grpc_out={OUT}",
        *protos,
    ]
    code = protoc.main(args)
    if code != 0:
        print(f"protoc failed with exit code {code}", file=sys.stderr)
    return int(code)


if __name__ == "__main__":
    raise SystemExit(main())
