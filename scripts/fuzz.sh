#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ for a bounded time each (libFuzzer, one process).
#   scripts/fuzz.sh                   # every target, FUZZ_SECONDS (default 60) each
#   scripts/fuzz.sh metadata_patch    # one target
#   FUZZ_SECONDS=600 scripts/fuzz.sh filter
# Installs cargo-fuzz when absent. Works on a stable toolchain (RUSTC_BOOTSTRAP lets it use
# the nightly-only flags cargo-fuzz needs). Exits nonzero on the first crash, leaving the
# input in fuzz/artifacts/<target>/ (reproduce: cargo fuzz run <target> <file>). The
# corpus grows in fuzz/corpus/<target>/, seeded from fuzz/seeds/<target>/.
# Not part of scripts/test.sh: too slow for CI. Findings become unit tests beside the code.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_EACH=${FUZZ_SECONDS:-60}
# AddressSanitizer needs nightly runtime support; the code is `unsafe`-free, so the fuzzers
# look for panics, overflows, timeouts and memory blow-ups, which need no sanitizer.
SANITIZER=${FUZZ_SANITIZER:-none}
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi

all=$(cargo fuzz list)
if [ $# -gt 0 ]; then
  for t in "$@"; do
    grep -qx "$t" <<<"$all" || { echo "unknown target '$t'; targets: $(echo $all)" >&2; exit 2; }
  done
  targets="$*"
else
  targets=$all
fi

cargo fuzz build -O --sanitizer "$SANITIZER"
for t in $targets; do
  mkdir -p "fuzz/corpus/$t"
  seeds=()
  [ -d "fuzz/seeds/$t" ] && seeds=("fuzz/seeds/$t")
  dict=()
  [ -f "fuzz/dicts/$t.dict" ] && dict=("-dict=fuzz/dicts/$t.dict")
  echo "== $t: ${SECONDS_EACH}s" >&2
  # -timeout: one input taking over 10 s is a finding (a blow-up); -rss_limit_mb: so is
  # using over 2 GiB. Input size is capped like a realistic request.
  cargo fuzz run -O --sanitizer "$SANITIZER" "$t" "fuzz/corpus/$t" "${seeds[@]}" -- \
    -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 \
    -max_len=65536 -print_final_stats=1 "${dict[@]}"
done
echo "fuzzing finished without findings" >&2
