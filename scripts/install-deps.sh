#!/usr/bin/env bash
# Installs ferry's build dependencies from Debian 12 packages. Idempotent: already-installed packages
# are left alone, and nothing is downloaded when everything is present.
set -euo pipefail
pkgs=(build-essential cmake ninja-build ccache pkg-config
      libdnnl-dev ocl-icd-opencl-dev libtbb-dev libhwloc-dev liburing-dev libxxhash-dev doctest-dev
      nlohmann-json3-dev libcli11-dev libpcre2-dev libutf8proc-dev libcpp-httplib-dev)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
  echo "install-deps: all ${#pkgs[@]} packages present"
  exit 0
fi
sudo=""
if [[ $(id -u) != 0 ]]; then sudo="sudo"; fi
echo "install-deps: installing ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
