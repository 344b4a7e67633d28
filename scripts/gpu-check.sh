#!/usr/bin/env bash
# Check gust-gpu-bridge's CUDA backend on a GPU machine that has no Rust
# toolchain: build the test (and bench) binaries here, ship one folder, run
# it there.
#
#   scripts/gpu-check.sh build [OUT_DIR]   # here, on the build machine
#   scripts/gpu-check.sh run [DIR]         # there (or DIR/run.sh)
#
# `build` compiles in release mode with the CUDA feature, strips the
# binaries and copies them, this script and a run.sh into OUT_DIR
# (default: target/gpu-check). The CUDA libraries are loaded at run time, so
# the build machine needs no CUDA toolkit and no GPU.
#
# `run` prints nvidia-smi, finds libnvrtc/libcublas if the loader cannot,
# runs every test binary with --include-ignored --nocapture and
# GUST_REQUIRE_CUDA=1 (so a missing device fails instead of skipping), then
# every bench binary with a short measurement time. It exits non-zero if any
# of them failed.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: scripts/gpu-check.sh build [OUT_DIR]
       scripts/gpu-check.sh run [DIR]

build   Build the gust-gpu-bridge test binaries (and bench binaries, if
        gpu-bridge/benches/*.rs exist) in release mode with the CUDA
        feature, strip them and copy them with run.sh into OUT_DIR
        (default: target/gpu-check under the repository). Copy that folder
        to the GPU machine.
run     Run what `build` produced in DIR (default: this script's folder if
        it holds the binaries, else target/gpu-check). Needs the NVIDIA
        driver, libnvrtc and libcublas (CUDA 12 or 13), no Rust toolchain.

Environment:
  GUST_CUDA_FEATURES    cargo features for `build` (default: cuda; cuda-12
                        binds the CUDA 12.8 API for CUDA 12 drivers)
  CUDARC_CUDA_VERSION   CUDA API version for `build` (default 13000, i.e.
                        13.0, unless the features include cuda-12)
  GUST_BENCH_TIME       bench measurement seconds per benchmark (default 2)
  GUST_SKIP_BENCHES     set to 1 to run only the tests
  GUST_BENCH_FILTER     a criterion filter (regex) for the bench binaries
  GUST_TEST_ARGS        extra arguments for the test binaries (e.g. a name
                        filter)
  GUST_REQUIRE_CUDA     `run` sets it to 1 unless it is set already
EOF
}

die() {
    echo "gpu-check: $*" >&2
    exit 1
}

script_dir() {
    cd "$(dirname "${BASH_SOURCE[0]}")" && pwd
}

# The executables cargo reports building (`cargo <args>
# --message-format=json`) for targets of a kind matching the jq regex $1,
# one "name path" per line. Unit tests of the library are kind "lib" with
# profile.test set; integration tests are kind "test"; benches "bench".
artifacts() {
    local kinds=$1
    shift
    cargo "$@" --message-format=json |
        jq -r --arg kinds "$kinds" '
            select(.reason == "compiler-artifact" and .executable != null)
            | select(.profile.test or (.target.kind | index("bench")))
            | select(.target.kind | any(test("^(" + $kinds + ")$")))
            | "\(.target.name) \(.executable)"'
}

copy_stripped() {
    local src=$1 dest=$2
    cp "$src" "$dest"
    chmod u+w "$dest"
    if command -v strip >/dev/null 2>&1; then
        strip --strip-all "$dest"
    else
        echo "gpu-check: strip not found; $dest keeps its symbols" >&2
    fi
}

build() {
    local root out features
    root=$(cd "$(script_dir)/.." && pwd)
    out=${1:-$root/target/gpu-check}
    features=${GUST_CUDA_FEATURES:-cuda}
    command -v cargo >/dev/null 2>&1 || die "cargo not found"
    command -v jq >/dev/null 2>&1 || die "jq not found (needed to read cargo's JSON output)"
    if [[ -z ${CUDARC_CUDA_VERSION:-} && $features != *cuda-12* ]]; then
        # Pin the CUDA 13.0 API rather than cudarc's default (nvcc's version
        # or the newest it knows): drivers >= 580 provide it.
        export CUDARC_CUDA_VERSION=13000
    fi
    cd "$root"
    rm -rf "$out"
    mkdir -p "$out"
    out=$(cd "$out" && pwd)

    echo "gpu-check: building tests (features: $features, CUDA API: ${CUDARC_CUDA_VERSION:-12080})"
    local found=0 name path
    while read -r name path; do
        [[ -n $path ]] || continue
        copy_stripped "$path" "$out/test-$name"
        found=$((found + 1))
    done < <(artifacts 'lib|test' test -p gust-gpu-bridge --features "$features" --release --no-run)
    ((found > 0)) || die "cargo built no test binary"

    if compgen -G "gpu-bridge/benches/*.rs" >/dev/null; then
        echo "gpu-check: building benches"
        while read -r name path; do
            [[ -n $path ]] || continue
            copy_stripped "$path" "$out/bench-$name"
        done < <(artifacts bench bench -p gust-gpu-bridge --features "$features" --no-run)
    fi

    cp "${BASH_SOURCE[0]}" "$out/gpu-check.sh"
    chmod +x "$out/gpu-check.sh"
    cat >"$out/run.sh" <<'EOF'
#!/usr/bin/env bash
# Runs the gust-gpu-bridge CUDA checks in this folder (see gpu-check.sh).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec "$here/gpu-check.sh" run "$here"
EOF
    chmod +x "$out/run.sh"
    {
        echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
        echo "features: $features"
        echo "CUDA API: ${CUDARC_CUDA_VERSION:-12080}"
        (cd "$out" && ls -l test-* bench-* 2>/dev/null)
    } >"$out/MANIFEST.txt"
    cat "$out/MANIFEST.txt"
    echo "gpu-check: copy $out to the GPU machine and run its run.sh"
}

# Whether a directory of LD_LIBRARY_PATH holds $1*.
on_library_path() {
    local lib=$1 dir
    local -a dirs
    IFS=: read -r -a dirs <<<"${LD_LIBRARY_PATH:-}"
    for dir in "${dirs[@]}"; do
        [[ -n $dir ]] && compgen -G "$dir/$lib*" >/dev/null && return 0
    done
    return 1
}

# Make libnvrtc and libcublas loadable: keep what the loader finds, else add
# the usual CUDA and pip locations that hold them to LD_LIBRARY_PATH.
find_cuda_libraries() {
    local lib dir
    for lib in libnvrtc.so libcublas.so; do
        if ldconfig -p 2>/dev/null | grep -q "$lib"; then
            continue
        fi
        if on_library_path "$lib"; then
            continue
        fi
        for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/*/lib /usr/local/cuda-*/lib64 \
            /usr/local/cuda-*/targets/*/lib /usr/lib/x86_64-linux-gnu /usr/lib64 /opt/conda/lib \
            /usr/local/lib/python3*/dist-packages/nvidia/*/lib /usr/local/lib/python3*/site-packages/nvidia/*/lib \
            /usr/lib/python3/dist-packages/nvidia/*/lib; do
            if compgen -G "$dir/$lib*" >/dev/null; then
                export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
                echo "gpu-check: $lib found in $dir"
                break
            fi
        done
    done
}

run() {
    local dir=${1:-}
    if [[ -z $dir ]]; then
        dir=$(script_dir)
        compgen -G "$dir/test-*" >/dev/null || dir="$(script_dir)/../target/gpu-check"
    fi
    [[ -d $dir ]] || die "no folder $dir (run \`$0 build\` first)"
    dir=$(cd "$dir" && pwd)
    compgen -G "$dir/test-*" >/dev/null || die "no test binaries in $dir (run \`$0 build\` first)"
    [[ -f $dir/MANIFEST.txt ]] && cat "$dir/MANIFEST.txt"

    echo "==== nvidia-smi"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi || echo "gpu-check: nvidia-smi failed" >&2
    else
        echo "gpu-check: nvidia-smi not found" >&2
    fi
    find_cuda_libraries
    echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
    export GUST_REQUIRE_CUDA=${GUST_REQUIRE_CUDA:-1}
    export RUST_BACKTRACE=${RUST_BACKTRACE:-1}

    local failed=() bin
    for bin in "$dir"/test-*; do
        echo "==== $(basename "$bin")"
        # shellcheck disable=SC2086 # GUST_TEST_ARGS is a list of words
        if ! "$bin" --include-ignored --nocapture ${GUST_TEST_ARGS:-}; then
            failed+=("$(basename "$bin")")
        fi
    done
    for bin in "$dir"/bench-*; do
        [[ -e $bin && ${GUST_SKIP_BENCHES:-0} != 1 ]] || continue
        echo "==== $(basename "$bin")"
        # shellcheck disable=SC2086 # GUST_BENCH_FILTER is one optional word
        if ! "$bin" --bench --noplot --warm-up-time 1 --measurement-time "${GUST_BENCH_TIME:-2}" ${GUST_BENCH_FILTER:-}; then
            failed+=("$(basename "$bin")")
        fi
    done
    if ((${#failed[@]} > 0)); then
        echo "gpu-check: FAILED: ${failed[*]}" >&2
        exit 1
    fi
    echo "gpu-check: all passed"
}

case ${1:-} in
build)
    shift
    build "$@"
    ;;
run)
    shift
    run "$@"
    ;;
-h | --help | help)
    usage
    ;;
*)
    usage >&2
    exit 2
    ;;
esac
