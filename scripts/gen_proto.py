"""Generate the Python gRPC stubs of the nanwatch API from proto/.

Run from anywhere: ``python scripts/gen_proto.py [OUT_DIR]``. Without OUT_DIR
the stubs are written into the source tree (nanwatch/v1/), where they are
committed; a test regenerates them into a temporary folder and compares.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "proto"
PROTO_FILES = sorted(PROTO_ROOT.glob("nanwatch/v1/*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Write *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every API proto into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    include_dir = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include_dir}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(path.relative_to(PROTO_ROOT)) for path in PROTO_FILES),
    ]
    exit_code = protoc.main(args)
    if exit_code != 0:
        raise RuntimeError(f"protoc failed with exit code {exit_code} for {PROTO_FILES}")
    return sorted((out_dir / "nanwatch" / "v1").glob("*_pb2*.py*"))


def main() -> int:
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO_ROOT
    for path in generate(out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
