#!/usr/bin/env bash
# Installs the tools `gust build app.js|app.ts` drives, from npm:
# ComponentizeJS (which brings its SpiderMonkey engine and Wizer) and
# esbuild. Idempotent: a prefix that already has these versions is kept.
#
#   scripts/setup-js.sh                  # into $GUST_JS_TOOLS or /var/tmp/gust-js-tools
#   export GUST_JS_TOOLS=/var/tmp/gust-js-tools   # where `gust build` looks
set -euo pipefail

componentize_js="0.23.0"
esbuild="0.28.2"
prefix="${GUST_JS_TOOLS:-/var/tmp/gust-js-tools}"
bin="$prefix/node_modules/.bin"

if [ -x "$bin/componentize-js" ] && [ -x "$bin/esbuild" ] &&
    [ "$("$bin/componentize-js" --version 2>/dev/null)" = "$componentize_js" ] &&
    [ "$("$bin/esbuild" --version 2>/dev/null)" = "$esbuild" ]; then
    echo "componentize-js $componentize_js and esbuild $esbuild already in $prefix"
    exit 0
fi

if ! command -v npm >/dev/null 2>&1; then
    echo "error: npm is needed (Node.js 18 or later, e.g. apt-get install nodejs npm)" >&2
    exit 1
fi
mkdir -p "$prefix"
# esbuild's install script fetches nothing here: its platform binary is an
# npm package of its own, installed beside it.
npm install --prefix "$prefix" --no-audit --no-fund --loglevel=error \
    "@bytecodealliance/componentize-js@$componentize_js" "esbuild@$esbuild"
echo "componentize-js $("$bin/componentize-js" --version), esbuild $("$bin/esbuild" --version)"
echo "installed in $prefix; gust finds them there (or set GUST_JS_TOOLS=$prefix)"
