# Sourced by the install scripts: `debian_install PACKAGE...` installs, from Debian's packages,
# those not installed yet. Needs root (apt-get) only when something is missing.
debian_install() {
  local missing=() package
  for package in "$@"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' \
      || missing+=("$package")
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  [ "$(id -u)" = 0 ] || { echo "run as root to install ${missing[*]}" >&2; return 1; }
  echo "installing ${missing[*]} from Debian's packages" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # A packaged daemon (containerd, dnsmasq) would start a system service where systemd runs;
  # the e2e cluster and the benchmarks start their own, with their own configuration.
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
