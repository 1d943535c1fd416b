#!/usr/bin/env bash
# Differential test of agt-jail's policy kernel against AGT's Python evaluators.
# Usage: bash tests/differential/run.sh [--seed N] [--toolkit-groups N] [--v4-groups N]
# Env: AGT_JAIL_BIN (default target/debug/agt-jail), PYTHON (default python3),
#      AGT_VENV (default target/agt-differential-venv, used only if PYTHON lacks the package).
set -euo pipefail
cd "$(dirname "$0")/../.."

AGT_PKG="agent-governance-toolkit-core"
AGT_VERSION="5.0.0"
PY="${PYTHON:-python3}"

has_agt() {
    "$1" - <<PYEOF 2>/dev/null
import importlib.metadata as m, sys
sys.exit(0 if m.version("$AGT_PKG") == "$AGT_VERSION" else 1)
PYEOF
}

if ! has_agt "$PY"; then
    VENV="${AGT_VENV:-target/agt-differential-venv}"
    if [ ! -x "$VENV/bin/python" ]; then
        "$PY" -m venv "$VENV" >/dev/null 2>&1 || true
    fi
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
        PY="$VENV/bin/python"
        has_agt "$PY" || "$PY" -m pip install --quiet --disable-pip-version-check "$AGT_PKG==$AGT_VERSION"
    else
        # No usable venv (e.g. Debian without python3-venv): install for the user instead.
        rm -rf "$VENV"
        "$PY" -m pip install --quiet --disable-pip-version-check --user "$AGT_PKG==$AGT_VERSION" \
            || "$PY" -m pip install --quiet --disable-pip-version-check --user --break-system-packages "$AGT_PKG==$AGT_VERSION"
    fi
fi

BIN="${AGT_JAIL_BIN:-target/debug/agt-jail}"
if [ ! -x "$BIN" ]; then
    cargo build -p agt-jail-cli
    BIN="${CARGO_TARGET_DIR:-target}/debug/agt-jail"
fi

exec "$PY" tests/differential/differential.py --bin "$BIN" "$@"
