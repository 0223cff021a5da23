#!/usr/bin/env bash
# Installs what the e2e cluster's real node needs, from Debian's packages and rustup:
#   containerd, runc, the CNI plugins   the container runtime and pod network the kubelet drives
#   dnsmasq-base                        the cluster DNS the sidecars forward other names to
#   musl-tools + the musl Rust target    static binaries for the images built locally
# Idempotent: installs only what is missing. Needs root (apt-get).
set -euo pipefail

packages=(containerd runc containernetworking-plugins dnsmasq-base musl-tools iproute2)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' \
    || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { echo "install.sh: run as root to install ${missing[*]}" >&2; exit 1; }
  echo "install.sh: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # The packaged containerd would start a system service where systemd runs; the e2e cluster
  # starts its own containerd with its own configuration and directories instead.
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if command -v rustup >/dev/null; then
  rustup target list --installed | grep -qx x86_64-unknown-linux-musl \
    || rustup target add x86_64-unknown-linux-musl
fi
