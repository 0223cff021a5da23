#!/usr/bin/env bash
# Runs every ServiceKeel fuzz target (libFuzzer through cargo-fuzz) for SECONDS each (default 60)
# and prints the executions of each. The working corpus lives outside the checkout, in
# $SERVICEKEEL_CACHE/fuzz/<target> (default ~/.cache/servicekeel), seeded from
# proxy/fuzz/seeds/<target>; a crash stops the run with its input under proxy/fuzz/artifacts/.
#   proxy/fuzz/run.sh [SECONDS] [TARGET...]
# Needs the nightly toolchain and cargo-fuzz (installed here when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(annotations admission_review tunnel_wire dns_request)
case "$seconds" in ''|*[!0-9]*) echo "run.sh: SECONDS must be a number, not $seconds" >&2; exit 2;; esac

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

cache=${SERVICEKEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/servicekeel}/fuzz
cargo +nightly fuzz build >/dev/null
status=0
for target in "${targets[@]}"; do
  corpus="$cache/$target"
  mkdir -p "$corpus"
  log=$(mktemp)
  if cargo +nightly fuzz run "$target" "$corpus" fuzz/seeds/"$target" -- \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    runs=$(awk '/^stat::number_of_executed_units:/ {print $2}' "$log")
    echo "fuzz $target: ${runs:-?} executions in ${seconds}s, no crash ($(ls "$corpus" | wc -l) corpus inputs)"
  else
    echo "fuzz $target: FAILED; the end of its output:" >&2
    tail -40 "$log" >&2
    status=1
  fi
  rm -f "$log"
done
exit "$status"
