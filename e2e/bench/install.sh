#!/usr/bin/env bash
# Installs the baselines servicekeel-bench measures ServiceKeel against, from Debian's packages:
#   socat          the same two TCP/Unix-socket hops as the sidecar and router
#   dnsmasq-base   a DNS server answering the same names as the sidecar
#   dnsperf        the DNS load generator for both
# Idempotent: installs only what is missing. Needs root (apt-get).
set -euo pipefail
. "$(dirname "$0")/../debian.sh"
debian_install socat dnsmasq-base dnsperf
