#!/usr/bin/env bash
# Installs componentize-py (the tool `gust build app.py` drives) into a venv,
# from PyPI. Idempotent: a venv that already has the right version is kept.
#
#   scripts/setup-python.sh             # venv in $GUST_PYTHON_VENV or /var/tmp/gust-py-venv
#   export GUST_PYTHON_VENV=/var/tmp/gust-py-venv   # where `gust build` looks
set -euo pipefail

# The Python SDK is written against this release's generated bindings.
version="0.25.1"
venv="${GUST_PYTHON_VENV:-/var/tmp/gust-py-venv}"

if [ -x "$venv/bin/componentize-py" ] &&
    [ "$("$venv/bin/componentize-py" --version 2>/dev/null)" = "componentize-py $version" ]; then
    echo "componentize-py $version already in $venv"
    exit 0
fi

if ! command -v python3 >/dev/null 2>&1; then
    echo "error: python3 is needed to create the venv (e.g. apt-get install python3 python3-venv)" >&2
    exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check "componentize-py==$version"
"$venv/bin/componentize-py" --version
echo "installed in $venv; gust finds it there (or set GUST_PYTHON_VENV=$venv)"
