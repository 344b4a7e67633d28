#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a short, bounded time: a smoke
# run for CI, from the committed seeds (fuzz/corpus/<target>) plus binary
# seeds made here (a component from the test guests, minimal GGUF and
# safetensors files). A crash, a panic, a timeout or running out of memory
# fails the run and leaves the input under fuzz/artifacts/<target>/.
#
# Usage: tests/fault/fuzz.sh [SECONDS-PER-TARGET]   (default 10)
# Longer runs: cargo fuzz run <target> -- -max_total_time=3600 (see
# docs/security.md).
set -euo pipefail
cd "$(dirname "$0")/../.."

seconds="${1:-10}"
target_dir="${CARGO_TARGET_DIR:-target}"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install cargo-fuzz --version 0.13.2 --locked
fi
# No sanitizer: libFuzzer's coverage guidance works on stable Rust (the
# sanitizers need nightly); panics and crashes are still caught.
fuzz() { # command [args…]: the options go before the command's arguments
    local command="$1"
    shift
    cargo fuzz "$command" --sanitizer none --dev --fuzz-dir fuzz "$@"
}
fuzz build

seeds="$(mktemp -d)"
trap 'rm -rf "$seeds"' EXIT
mkdir -p "$seeds/component" "$seeds/gguf" "$seeds/safetensors" "$seeds/op_plan"
guests="$target_dir/gust-guests/wasm32-wasip2/release"
for guest in hello echo http_hello; do
    if [ -f "$guests/$guest.wasm" ]; then cp "$guests/$guest.wasm" "$seeds/component/"; fi
done
printf '\0asm\r\0\1\0' >"$seeds/component/empty-component"
# GGUF v3: magic, version, no tensors, one string metadata entry.
printf 'GGUF\3\0\0\0\0\0\0\0\0\0\0\0\1\0\0\0\0\0\0\0\4\0\0\0\0\0\0\0name\10\0\0\0\1\0\0\0\0\0\0\0x' >"$seeds/gguf/minimal"
# safetensors: an 8-byte header length, the JSON header, the data.
header='{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
{ printf "\\$(printf '%03o' ${#header})\0\0\0\0\0\0\0"; printf '%s' "$header"; printf '\0\0\200?\0\0\0@'; } >"$seeds/safetensors/minimal"
printf '\0\2\0\2\2\3\0\2\3\4' >"$seeds/op_plan/matmul"

failed=0
for target in policy component map_split gguf safetensors op_plan; do
    corpus="$seeds/$target-corpus"
    mkdir -p "$corpus"
    cp -r fuzz/corpus/"$target"/. "$corpus"/ 2>/dev/null || true
    cp -r "$seeds/$target"/. "$corpus"/ 2>/dev/null || true
    echo "--- $target (${seconds}s)"
    # -timeout per input: the component seeds are whole guests that a debug
    # (`--dev`) Wasmtime compiles, and one took over 10 s on the 2-core CI
    # machine (a timeout artifact, not a hang); a real hang still fails.
    if ! fuzz run "$target" "$corpus" -- -max_total_time="$seconds" -timeout=60 \
        -rss_limit_mb=4096 -print_final_stats=1 2>"$seeds/$target.log"; then
        tail -40 "$seeds/$target.log"
        echo "FAILED: $target (the input is under fuzz/artifacts/$target/)"
        failed=1
    else
        grep -E '^stat::number_of_executed_units|^Done' "$seeds/$target.log" || true
    fi
done
exit "$failed"
