"""The committed gRPC stubs match what scripts/gen_proto.py generates from proto/."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_proto", REPO_ROOT / "scripts" / "gen_proto.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stubs_match_proto(tmp_path: Path) -> None:
    generated = _load_generator().generate(tmp_path)
    assert generated, "the generator wrote no files"
    for path in generated:
        committed = REPO_ROOT / "nanwatch" / "v1" / path.name
        assert committed.exists(), f"{committed} is missing; run `make proto`"
        assert committed.read_text() == path.read_text(), f"{committed.name} drifted from proto/; run `make proto`"


def test_no_stale_stub_files(tmp_path: Path) -> None:
    generated = {path.name for path in _load_generator().generate(tmp_path)}
    committed = {path.name for path in (REPO_ROOT / "nanwatch" / "v1").glob("*_pb2*.py*")}
    assert committed == generated
