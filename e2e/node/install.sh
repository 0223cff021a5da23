#!/usr/bin/env bash
# Installs what the e2e cluster's real node needs, from Debian's packages and rustup:
#   containerd, runc, the CNI plugins   the container runtime and pod network the kubelet drives
#   dnsmasq-base                        the cluster DNS the sidecars forward other names to
#   musl-tools + the musl Rust target    static binaries for the images built locally
# Idempotent: installs only what is missing. Needs root (apt-get).
set -euo pipefail

. "$(dirname "$0")/../debian.sh"
debian_install containerd runc containernetworking-plugins dnsmasq-base musl-tools iproute2

if command -v rustup >/dev/null; then
  rustup target list --installed | grep -qx x86_64-unknown-linux-musl \
    || rustup target add x86_64-unknown-linux-musl
fi
