#!/usr/bin/env bash
# From a fresh Debian 12 machine (root or sudo) to the project venv with ROS 2 wheels.
# Idempotent: a second run checks and returns in seconds. Called by `make setup` (so by `make test`
# and `make demo`).
#   DISTRO=kilted (default): requirements/ros.txt, Python 3.11 (python3 on Debian 12), venv .venv
#   DISTRO=jazzy:            requirements/ros-jazzy.txt, Python 3.12, venv .venv-jazzy
#   DISTRO=py310:            requirements/py310.txt only (no ROS), Python 3.10, venv .venv-py310
# PYTHON=/path/to/python3.X overrides the interpreter (a pyenv version is found by itself).
set -euo pipefail
cd "$(dirname "$0")/.."

DISTRO=${DISTRO:-kilted}
case "$DISTRO" in
  kilted) ROS_REQ=requirements/ros.txt;       WANT_PY=3.11; DEFAULT_VENV=.venv ;;
  jazzy)  ROS_REQ=requirements/ros-jazzy.txt; WANT_PY=3.12; DEFAULT_VENV=.venv-jazzy ;;
  py310)  ROS_REQ="";                         WANT_PY=3.10; DEFAULT_VENV=.venv-py310 ;;
  *) echo "[setup] DISTRO=$DISTRO unknown: use kilted, jazzy or py310" >&2; exit 2 ;;
esac
VENV=${VENV:-$DEFAULT_VENV}

# The interpreter: $PYTHON, else python$WANT_PY on PATH, else a pyenv install of that version,
# else (Kilted only) python3 when it is $WANT_PY. The wheels exist for cp310-cp313; the pins in
# requirements/base.txt are tested on 3.11 (Kilted) and 3.12 (Jazzy).
find_python() {
  local candidate
  for candidate in "python$WANT_PY" python3; do
    if command -v "$candidate" >/dev/null 2>&1 \
       && "$candidate" -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$WANT_PY'.split('.'))))" 2>/dev/null; then
      command -v "$candidate"; return 0
    fi
  done
  local root
  root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
  for candidate in "$root"/versions/"$WANT_PY".*/bin/python"$WANT_PY"; do
    [ -x "$candidate" ] && { echo "$candidate"; return 0; }
  done
  return 1
}
if [ -z "${PYTHON:-}" ] && [ ! -x "$VENV/bin/python" ]; then
  PYTHON=$(find_python) || {
    echo "[setup] DISTRO=$DISTRO needs Python $WANT_PY (not found on PATH or under pyenv);" \
         "install it or pass PYTHON=/path/to/python$WANT_PY" >&2; exit 2; }
fi
PYTHON=${PYTHON:-python3}
APT_PACKAGES=(python3-dev python3-venv build-essential cmake git portaudio19-dev espeak-ng sox
              libspeexdsp1 libspeexdsp-dev)

log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

# 1. Debian packages ------------------------------------------------------------------------------
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# 2. The venv (the ROS install prefix) ------------------------------------------------------------
if [ -n "$ROS_REQ" ]; then
  REQS=("$ROS_REQ" requirements/base.txt requirements/dev.txt)
else
  REQS=(requirements/py310.txt requirements/py310-nodeps.txt)
fi
want=$(cat "${REQS[@]}" scripts/setup_env.sh scripts/fix_ros_wheels.py | sha256sum | cut -d' ' -f1)
stamp="$VENV/.omni_ros_setup"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  log "venv up to date ($VENV)"
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@" 2>&1 | grep -v '^WARNING: Location' || true; }
pip install -q --upgrade "pip>=24"
if [ -z "$ROS_REQ" ]; then
  log "installing the Python $WANT_PY check's dependencies (requirements/py310.txt; no ROS)"
  pip install -q -r requirements/py310.txt
  pip install -q --no-deps -r requirements/py310-nodeps.txt
  "$VENV/bin/python" -c "import numpy, scipy, rosbags, soxr, webrtcvad, yaml" \
    || { echo "[setup] dependency install failed (see pip output above)" >&2; exit 1; }
  echo "$want" > "$stamp"
  log "venv ready (no ROS)"
  exit 0
fi
log "installing ROS 2 $DISTRO wheels ($ROS_REQ) and Python dependencies (pinned)"
pip install -q -r "$ROS_REQ" -r requirements/base.txt -r requirements/dev.txt
"$VENV/bin/python" -c "import rclpy, torch, transformers, rosbags, soxr, webrtcvad" \
  || { echo "[setup] dependency install failed (see pip output above)" >&2; exit 1; }

# 3. Repair the wheels' CMake exports and make the venv a colcon underlay -------------------------
"$VENV/bin/python" scripts/fix_ros_wheels.py
echo "$want" > "$stamp"
log "venv ready"
