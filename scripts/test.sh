#!/usr/bin/env bash
# The README's test command: installs fsbridge with its test extras and the system
# tools the tests drive (Lua for the dialplan script, nginx for the record bench),
# lints, then runs the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'
python3 -m ruff check fsbridge tests bench scripts
python3 -m pytest -q "$@"
