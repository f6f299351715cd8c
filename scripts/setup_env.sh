#!/usr/bin/env bash
# From a fresh Debian 12 machine (root or sudo) to the project venv with ROS 2 Kilted wheels.
# Idempotent: a second run checks and returns in seconds. Called by `make setup` (so by `make test`
# and `make demo`).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
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
want=$(cat requirements/*.txt scripts/setup_env.sh scripts/fix_ros_wheels.py | sha256sum | cut -d' ' -f1)
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
log "installing ROS 2 Kilted wheels and Python dependencies (pinned)"
pip install -q --upgrade "pip>=24"
pip install -q -r requirements/ros.txt -r requirements/base.txt -r requirements/dev.txt
"$VENV/bin/python" -c "import rclpy, torch, transformers, rosbags, soxr, webrtcvad" \
  || { echo "[setup] dependency install failed (see pip output above)" >&2; exit 1; }

# 3. Repair the wheels' CMake exports and make the venv a colcon underlay -------------------------
"$VENV/bin/python" scripts/fix_ros_wheels.py
echo "$want" > "$stamp"
log "venv ready"
