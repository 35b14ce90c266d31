#!/usr/bin/env bash
# Installs everything lorag needs on a fresh Debian 12 machine; safe to run again (each step is
# skipped when already done). Needs the Rust toolchain (rustup, rustc >= 1.89) already present.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PGRX_VERSION=0.18.0
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo

step() { printf '\n==> %s\n' "$*"; }

APT_PACKAGES=(build-essential pkg-config libssl-dev clang libclang-dev sudo git ca-certificates
    postgresql-15 postgresql-server-dev-15 postgresql-doc-15 python3 python3-venv python3-pip)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    step "apt packages: ${missing[*]}"
    $SUDO apt-get update -q
    # Debian's postgresql package would create and start a cluster on 5432; we run our own.
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null; then
    [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }

if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
    step "cargo-pgrx $PGRX_VERSION (about 7 minutes on 2 cores)"
    cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi

if ! grep -qs "pg15" "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
    step "cargo pgrx init"
    cargo pgrx init --pg15 "$PG_CONFIG"
fi

if [ ! -x "$ROOT/.venv/bin/pytest" ] || ! cmp -s "$ROOT/tests/requirements.txt" "$ROOT/.venv/requirements.txt"; then
    step "python test environment (.venv)"
    python3 -m venv "$ROOT/.venv"
    "$ROOT/.venv/bin/pip" install -q --disable-pip-version-check -r "$ROOT/tests/requirements.txt"
    cp "$ROOT/tests/requirements.txt" "$ROOT/.venv/requirements.txt"
fi
