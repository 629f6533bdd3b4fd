#!/usr/bin/env bash
# Create .venv with DOLFINx (pip wheel), PyTorch and nngf_fem (editable) -- idempotent.
#
# Finds the first working Python >= 3.12 among: $PYTHON, python3.13, python3.12 and
# pyenv's 3.12/3.13 installations. Re-running is a no-op (a second or so) unless
# pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
STAMP="$VENV/.nngf_fem-setup-stamp"

want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    exit 0
fi

ok_python() {  # $1: candidate interpreter; true if it runs and is >= 3.12
    "$1" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1
}

find_python() {
    local cands=()
    [[ -n "${PYTHON:-}" ]] && cands+=("$PYTHON")
    cands+=(python3.13 python3.12)
    if command -v pyenv >/dev/null 2>&1; then
        local root
        root=$(pyenv root)
        for d in "$root"/versions/3.13* "$root"/versions/3.12*; do
            [[ -d "$d" ]] && cands+=("$d/bin/python3")
        done
    fi
    cands+=(python3)
    for c in "${cands[@]}"; do
        local p
        p=$(command -v "$c" 2>/dev/null || true)
        [[ -n "$p" ]] && ok_python "$p" && { echo "$p"; return 0; }
    done
    return 1
}

if [[ ! -x "$VENV/bin/python" ]] || ! ok_python "$VENV/bin/python"; then
    if ! PY=$(find_python); then
        echo "setup: no Python >= 3.12 found (DOLFINx 0.11 needs it)." >&2
        echo "       Install one, or point PYTHON=/path/to/python3.12 at it and re-run." >&2
        exit 1
    fi
    echo "setup: creating $VENV with $PY ($("$PY" --version 2>&1))"
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
fi

echo "setup: installing nngf_fem[fem,test,demo,docs] into $VENV (first run downloads ~4 GB: torch + DOLFINx)"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[fem,test,demo,docs]"
"$VENV/bin/python" -c "import nngf_fem, dolfinx, torch; print('setup: nngf_fem', nngf_fem.__version__, '| dolfinx', dolfinx.__version__, '| torch', torch.__version__)"
echo "$want" > "$STAMP"
