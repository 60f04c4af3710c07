#!/bin/sh
# Install the nanwatch service without torch into a new virtual environment.
# Usage: install-service.sh VENV_DIR SOURCE_DIR
# The Dockerfile runs this script, and tests/deploy runs it on a fresh virtual
# environment, so the image and the test install the same way.
set -eu

if [ "$#" -ne 2 ]; then
    echo "usage: $0 VENV_DIR SOURCE_DIR (SOURCE_DIR contains pyproject.toml and requirements-lock.txt)" >&2
    exit 2
fi
venv_dir=$1
source_dir=$2

python3 -m venv "$venv_dir"
# The lock file constrains every dependency to the tested version. It lists
# torch too, but a constraint installs nothing, and the service extra needs no torch.
"$venv_dir/bin/pip" install --no-cache-dir --disable-pip-version-check \
    --constraint "$source_dir/requirements-lock.txt" "$source_dir[service]"
