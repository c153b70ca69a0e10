#!/usr/bin/env bash
# The README's test command: installs fsbridge with its test extras and the system
# tools the tests drive (Lua and curl for the dialplan script, lame for MP3 recordings), lints, then runs the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# The dialplan's Lua routing script is tested with a real Lua (LuaSocket and curl transports).
if ! command -v lua5.4 >/dev/null || ! command -v curl >/dev/null || ! command -v lame >/dev/null \
        || [ ! -e /usr/share/lua/5.4/socket.lua ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq lua5.4 lua-socket curl lame nginx-light >/dev/null; } \
            || echo "note: could not install lua5.4/lua-socket/curl/lame; the Lua and MP3 tests will be skipped" >&2
    else
        echo "note: lua5.4, lua-socket, curl or lame are missing; the Lua and MP3 tests will be skipped" >&2
    fi
fi
python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'
python3 -m ruff check fsbridge tests bench scripts
python3 -m pytest -q "$@"
