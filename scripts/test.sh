#!/usr/bin/env bash
# The README's test command. Installs what the tests drive (as root on Debian/Ubuntu: Lua 5.3 and 5.4 with
# LuaSocket and curl for the dialplan script, lame for MP3 recordings, nginx for the reverse-proxy test,
# python3-venv), creates a virtualenv
# (.venv, or $FSBRIDGE_VENV) with fsbridge and its test extras, lints, then runs the suite; arguments go to pytest.
# A virtualenv, because Debian's and Ubuntu's python3 refuse `pip install` outside one (PEP 668).
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(lua5.3 lua5.4 lua-socket curl lame nginx-light python3-venv chromium)
missing=()
for tool in lua5.3 lua5.4 curl lame nginx; do command -v "$tool" >/dev/null || missing+=("$tool"); done
[ -e /usr/share/lua/5.4/socket.lua ] || missing+=(lua-socket)
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null; } \
            || echo "note: could not install ${packages[*]}; the tests that need them will be skipped" >&2
    else
        echo "note: missing ${missing[*]} (Debian: apt-get install ${packages[*]}); the tests that need them will be skipped" >&2
    fi
fi
venv="${FSBRIDGE_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" || { echo "error: python3 -m venv failed (Debian/Ubuntu: apt-get install python3-venv)" >&2; exit 1; }
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[test]'
"$venv/bin/python" -m ruff check fsbridge tests bench scripts
exec "$venv/bin/python" -m pytest -q "$@"
