#!/usr/bin/env bash
# install-ffcv.sh -- build ffcv 1.0.2 (source-only on PyPI) into an existing venv, on Debian 12.
#
#   bash .ci/install-ffcv.sh VENV_DIR          (as root, or with the apt packages already there)
#
# 1. apt: libturbojpeg0-dev libopencv-core-dev libopencv-imgproc-dev pkg-config
#    (--no-install-recommends; skipped when they are all installed already).
# 2. ffcv's setup.py asks pkg-config for `opencv4`, whose .pc file only ships in the huge
#    libopencv-dev (~200 packages). Unless a real opencv4.pc exists, a stand-in is written to a
#    temp dir: opencv4.pc (core + imgproc only) and an include/opencv2/opencv.hpp that includes
#    only core.hpp and imgproc.hpp; PKG_CONFIG_PATH points at it during the pip install.
# 3. VENV_DIR/bin/pip install ffcv==1.0.2 with PIP_CONSTRAINT=<repo>/constraints.txt when that file
#    exists (it pins torch/torchvision), otherwise with the venv's current torch/torchvision pinned.
#    The script fails if torch changed anyway, then checks that ffcv imports.
# Idempotent: a second run only re-checks (pip sees ffcv already installed).
set -euo pipefail

FFCV_VERSION=1.0.2
APT_PKGS=(libturbojpeg0-dev libopencv-core-dev libopencv-imgproc-dev pkg-config)
REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

log() { printf '[install-ffcv %(%F %T)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

install_apt_packages() {
  local p missing=()
  for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then log "apt packages already installed"; return 0; fi
  [ "$(id -u)" = 0 ] || die "need root to apt-get install ${missing[*]}"
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

write_opencv_standin() {  # write_opencv_standin DIR: opencv4.pc + a minimal opencv2/opencv.hpp
  local dir=$1
  mkdir -p "$dir/include/opencv2"
  cat > "$dir/opencv4.pc" <<EOF
# stand-in for libopencv-dev's opencv4.pc: only the core and imgproc modules ffcv uses
Name: opencv4
Description: OpenCV core+imgproc (stand-in written by bip .ci/install-ffcv.sh)
Version: $(dpkg-query -W -f='${Version}' libopencv-core-dev | sed 's/[+-].*//')
Libs: -lopencv_imgproc -lopencv_core
Cflags: -I$dir/include -I/usr/include/opencv4
EOF
  cat > "$dir/include/opencv2/opencv.hpp" <<'EOF'
// stand-in for the umbrella header: ffcv only needs core and imgproc
#include <opencv2/core.hpp>
#include <opencv2/imgproc.hpp>
EOF
}

dist_version() {  # dist_version NAME: installed version in the venv (metadata only, no import), or "none"
  "$PY" -c 'import sys, importlib.metadata as m; print(m.version(sys.argv[1]))' "$1" 2>/dev/null || echo none
}

pip_install_ffcv() {
  local tmp=$1 torch_before torch_after
  if pkg-config --exists opencv4; then
    log "using the system opencv4.pc"
  else
    write_opencv_standin "$tmp/opencv"
    export PKG_CONFIG_PATH="$tmp/opencv${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
    pkg-config --cflags --libs opencv4 >/dev/null || die "opencv4 stand-in not usable"
  fi
  pkg-config --exists libturbojpeg || die "pkg-config does not find libturbojpeg"

  if [ -f "$REPO_DIR/constraints.txt" ]; then
    export PIP_CONSTRAINT="$REPO_DIR/constraints.txt"
  else  # no repo pins: at least keep the venv's torch/torchvision where they are
    : > "$tmp/constraints.txt"
    [ "$(dist_version torch)" = none ] || echo "torch==$(dist_version torch)" >> "$tmp/constraints.txt"
    [ "$(dist_version torchvision)" = none ] || echo "torchvision==$(dist_version torchvision)" >> "$tmp/constraints.txt"
    export PIP_CONSTRAINT="$tmp/constraints.txt"
  fi
  log "PIP_CONSTRAINT=$PIP_CONSTRAINT"

  torch_before=$(dist_version torch)
  log "pip install ffcv==$FFCV_VERSION (torch before: $torch_before)"
  "$VENV/bin/pip" install -q "ffcv==$FFCV_VERSION"
  torch_after=$(dist_version torch)
  [ "$torch_before" = "$torch_after" ] || die "pip changed torch: $torch_before -> $torch_after"
}

check_import() {
  "$PY" - <<'EOF'
import importlib.metadata as md
import ffcv  # noqa: F401  (ffcv.__version__ says 0.0.3rc1 in 1.0.2: read the metadata instead)
from ffcv.writer import DatasetWriter  # noqa: F401
from ffcv.loader import Loader, OrderOption  # noqa: F401
from ffcv.fields import RGBImageField, IntField  # noqa: F401
print(f"ffcv {md.version('ffcv')} imports fine (torch {md.version('torch')}, numpy {md.version('numpy')})")
EOF
}

main() {
  [ $# -eq 1 ] || { echo "usage: $0 VENV_DIR" >&2; exit 2; }
  VENV=$(cd "$1" && pwd) || die "no such venv: $1"
  PY=$VENV/bin/python
  [ -x "$VENV/bin/pip" ] || die "$VENV/bin/pip not found: create the venv first (make venv)"
  local t0=$SECONDS
  TMP_DIR=$(mktemp -d -t bip-ffcv.XXXXXX)
  trap 'rm -rf "$TMP_DIR"' EXIT

  install_apt_packages
  log "apt step done ($((SECONDS - t0)) s)"
  pip_install_ffcv "$TMP_DIR"
  log "pip step done ($((SECONDS - t0)) s)"
  check_import
  log "ffcv $FFCV_VERSION ready in $VENV ($((SECONDS - t0)) s)"
}

main "$@"
