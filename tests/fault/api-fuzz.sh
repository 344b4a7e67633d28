#!/usr/bin/env bash
# Schemathesis (PyPI) against the generated OpenAPI document of a live
# `gust serve`, with a tenant key and the admin key: every documented
# operation is tried with generated (valid and invalid) input. Fails on a
# 5xx, an undocumented status or content type, a response that does not
# match its schema, or the host going away. Bounded: --max-examples per
# operation and --max-time overall.
#
# Usage: tests/fault/api-fuzz.sh [SECONDS]   (default 120)
# Needs: a built `gust` (GUST=path, default $CARGO_TARGET_DIR/debug/gust),
# the test guests (hello.wasm, built by `cargo test`), python3.
set -euo pipefail
cd "$(dirname "$0")/../.."

budget="${1:-120}"
target_dir="${CARGO_TARGET_DIR:-target}"
gust="${GUST:-$target_dir/debug/gust}"
hello="${HELLO_WASM:-$target_dir/gust-guests/wasm32-wasip2/release/hello.wasm}"
venv="${GUST_SCHEMATHESIS_VENV:-/var/tmp/gust-schemathesis-venv}"
if [ ! -x "$venv/bin/st" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q 'schemathesis==4.32.5'
fi

work="$(mktemp -d)"
host_pid=""
cleanup() {
    if [ -n "$host_pid" ]; then kill "$host_pid" 2>/dev/null || true; wait "$host_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

admin="gust_fuzz-admin-key-0123456789abcdefghijklmnopqrstuvw"
mkdir -p "$work/policies"
# Short calls, so generated inputs cannot keep the run waiting.
printf 'timeout_ms = 2000\nmemory_mb = 64\n' >"$work/policies/default.toml"
GUST_GPU=cpu "$gust" serve --listen 127.0.0.1:0 --data-dir "$work/data" \
    --policies "$work/policies" --admin-key "$admin" >"$work/out" 2>"$work/err" &
host_pid=$!
for _ in $(seq 1 200); do
    grep -q 'listening on' "$work/out" 2>/dev/null && break
    sleep 0.1
done
url="$(sed -n 's/^gust: listening on //p' "$work/out")"
[ -n "$url" ] || { cat "$work/err"; echo "the host did not start"; exit 1; }
key="$(cat "$work/data/demo.key")"
# Something to find: a function for the per-function operations.
curl -sf -X PUT -H "Authorization: Bearer $key" --data-binary "@$hello" \
    "$url/v1/functions/hello" >/dev/null

run() {
    local who="$1" token="$2"; shift 2
    echo "--- schemathesis as $who"
    "$venv/bin/st" run "$url/v1/openapi.json" \
        -H "Authorization: Bearer $token" \
        --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
        --phases examples,coverage,fuzzing \
        --max-examples 25 --max-time "$budget" --request-timeout 10 \
        --workers 2 --suppress-health-check all "$@"
}
status=0
# The tenant's operations, then the admin's (tenants, keys of any tenant).
# Revoking keys last: schemathesis learns key ids from `GET /v1/keys` and
# would otherwise revoke its own key early and see only 401s after.
run tenant "$key" --exclude-path-regex '^/v1/tenants|^/metrics$' --exclude-operation-id revokeKey || status=1
run tenant "$key" --include-operation-id revokeKey || status=1
run admin "$admin" --include-path-regex '^/v1/tenants|^/metrics$' || status=1
if ! kill -0 "$host_pid" 2>/dev/null; then
    echo "the host died during the run:"; tail -50 "$work/err"; exit 1
fi
# Still serving: a new tenant deploys and calls a function after all of
# that (the runs may have deleted the first one's functions and keys).
after="$(curl -sf -X POST -H "Authorization: Bearer $admin" -d '{"name":"after-fuzz"}' "$url/v1/tenants" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"]["key"])')"
curl -sf -X PUT -H "Authorization: Bearer $after" --data-binary "@$hello" "$url/v1/functions/hello" >/dev/null
curl -sf -X POST -H "Authorization: Bearer $after" -d x "$url/v1/functions/hello/invoke" >/dev/null \
    || { echo "the host no longer serves invocations"; tail -50 "$work/err"; exit 1; }
echo "the host still serves"
exit "$status"
