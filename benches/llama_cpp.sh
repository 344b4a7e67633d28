#!/usr/bin/env bash
# SmolLM2-135M-Instruct (Q4_1 GGUF) generation, Gust against llama.cpp, side
# by side on this machine: same file, same prompt, same thread count,
# greedy. Three engines, interleaved (PASSES times each, ROUNDS rounds per
# pass, after a warm-up run):
#   - llama.cpp through llama-cpp-python 0.3.36, built here from its PyPI
#     source distribution (benches/llama_cpp_peer.py);
#   - Gust's llama runner called in process (gpu-bridge/benches/llama_cpp.rs);
#   - `gust serve` end to end: examples/generate invoked over HTTP (sandbox,
#     bridge, runner), timed by curl; compared with llama.cpp's whole
#     prompt + generation time.
# Prints each round, the medians and the ratios (Gust ÷ llama.cpp, higher
# is better for Gust), and whether the greedy tokens are llama.cpp's.
#
#   benches/llama_cpp.sh          # ~10 min the first time (llama.cpp build)
#
# Environment: THREADS (2), GEN (tokens to generate, 64), ROUNDS (3),
# PASSES (2), PROMPT (text), LLAMA_VENV (/var/tmp/gust-llama-cpp-venv),
# GUST_BIN (target/release/gust).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
bin="${GUST_BIN:-$target/release/gust}"
threads="${THREADS:-2}"
gen="${GEN:-64}"
rounds="${ROUNDS:-3}"
passes="${PASSES:-2}"
prompt="${PROMPT:-Once upon a time, there was a little robot who lived in a quiet village by the sea. Every morning it walked along the beach, collecting shells and talking to the seagulls about the weather, the tides and the ships that passed on the horizon. One day}"
venv="${LLAMA_VENV:-/var/tmp/gust-llama-cpp-venv}"
models="$root/gust-data/models"
gguf="$models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
port=18193
admin=adminkey-llama-cpp-bench-0123456789

# llama.cpp from source. With AMX on, its decode crashes on this machine's
# CPUs; GGML_NATIVE=OFF with the instruction sets named keeps the build
# independent of the machine that builds it.
if ! "$venv/bin/python" -c 'import llama_cpp' 2>/dev/null; then
    python3 -m venv "$venv"
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX2=ON \
-DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF" \
        "$venv/bin/pip" install --quiet --no-binary llama-cpp-python llama-cpp-python==0.3.36
fi
[ -f "$gguf" ] || "$root/scripts/fetch-models.sh" "$models"
(cd "$root" && cargo build --release -p gust-host --bin gust \
    && cargo bench -p gust-gpu-bridge --bench llama_cpp --no-run) >&2

work="$(mktemp -d /var/tmp/gust-llama-cpp.XXXXXX)"
trap 'kill "${pid:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir "$work/policies"
cat > "$work/policies/bench.toml" <<'EOF'
timeout_ms = 120000
[gpu]
models = ["smollm2-135m-instruct"]
time_ms_per_minute = 600000
EOF
# The device pool gets THREADS threads, as the other two engines do.
RAYON_NUM_THREADS="$threads" "$bin" serve --listen "127.0.0.1:$port" --data-dir "$work/data" \
    --policies "$work/policies" --models-dir "$models" --admin-key "$admin" \
    > "$work/serve.log" 2>&1 &
pid=$!
url="http://127.0.0.1:$port"
for _ in $(seq 100); do curl -sf "$url/healthz" >/dev/null && break; sleep 0.1; done
key=$(curl -sf -X POST -H "Authorization: Bearer $admin" -d '{"name":"bench"}' \
    "$url/v1/tenants" | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"]["key"])')
GUST_URL="$url" GUST_KEY="$key" "$bin" deploy "$root/examples/generate" >&2
body=$(python3 -c 'import json,sys; print(json.dumps({"prompt": sys.argv[1], "chat": False, "max_tokens": int(sys.argv[2])}))' "$prompt" "$gen")
serve_round() {
    curl -sf -o "$work/answer.json" -w '%{time_total}' -H "Authorization: Bearer $key" \
        -d "$body" "$url/v1/functions/generate/invoke"
}
serve_round >/dev/null # loads the model, warms the path

results="$work/results"
for pass in $(seq "$passes"); do
    echo "pass $pass" >&2
    "$venv/bin/python" "$root/benches/llama_cpp_peer.py" "$gguf" "$prompt" "$gen" "$rounds" "$threads" \
        | tee -a "$results"
    (cd "$root" && PROMPT="$prompt" GEN="$gen" ROUNDS="$rounds" THREADS="$threads" \
        GUST_MODELS_DIR="$models" cargo bench -q -p gust-gpu-bridge --bench llama_cpp 2>/dev/null) \
        | tee -a "$results"
    for _ in $(seq "$rounds"); do
        echo "serve seconds=$(serve_round)" | tee -a "$results"
    done
done

python3 - "$results" "$gen" "$work/answer.json" <<'EOF'
import json, re, statistics, sys

rows = open(sys.argv[1]).read().splitlines()
gen = int(sys.argv[2])
def field(engine, name):
    return [float(m.group(1)) for r in rows if r.startswith(engine + " ")
            for m in [re.search(rf"\b{name}=([0-9.]+)", r)] if m]
med = statistics.median
cpp_pp, cpp_tg = med(field("llama.cpp", "pp_tps")), med(field("llama.cpp", "tg_tps"))
run_pp, run_tg = med(field("runner", "pp_tps")), med(field("runner", "tg_tps"))
pp_tokens = field("runner", "pp_tokens")[0]
print(f"\nprompt {pp_tokens:.0f} tokens, {gen} generated, medians:")
print(f"prompt processing: llama.cpp {cpp_pp:.1f} tokens/s, runner {run_pp:.1f}: {run_pp / cpp_pp:.2f}x")
print(f"generation:        llama.cpp {cpp_tg:.1f} tokens/s, runner {run_tg:.1f}: {run_tg / cpp_tg:.2f}x")
# End to end: llama.cpp's prompt + generation time against one HTTP call.
cpp_total = pp_tokens / cpp_pp + (gen - 1) / cpp_tg
serve = med(field("serve", "seconds"))
print(f"end to end ({gen} tokens incl. prompt): llama.cpp {gen / cpp_total:.1f} tokens/s, "
      f"gust serve {gen / serve:.1f}: {cpp_total / serve:.2f}x")
tokens = lambda engine: [re.search(r" tokens=(\[.*\])", r).group(1) for r in rows
                         if r.startswith(engine + " ")]
cpp, ours = json.loads(tokens("llama.cpp")[0]), json.loads(tokens("runner")[0])
same = next((i for i, (a, b) in enumerate(zip(cpp, ours)) if a != b), min(len(cpp), len(ours)))
print(f"greedy tokens identical to llama.cpp's: the first {same} of {len(ours)}")
print("gust serve answered:", json.load(open(sys.argv[3]))["text"][:80].replace("\n", " "), "...")
EOF
