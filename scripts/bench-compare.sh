#!/usr/bin/env bash
# Side-by-side throughput of two server builds (and the second with its request log on),
# alternating the order per round so drift and noise fall on every arm alike.
#   scripts/bench-compare.sh BASE_EPR NEW_EPR [EPR_BENCH]
# BASE_EPR/NEW_EPR: release `epr` binaries (copies: target/ changes under you);
# EPR_BENCH: defaults to target/release/epr-bench. ROUNDS (3), DURATION (5 s), OUT (dir).
# Prints one line per arm, round and phase (the epr-bench table row); full tables, JSON
# and server output are kept in OUT.
set -u
BASE=${1:?base epr binary}; NEW=${2:?new epr binary}
BENCH=${3:-target/release/epr-bench}
OUT=${OUT:-$(mktemp -d)}; mkdir -p "$OUT"
ROUNDS=${ROUNDS:-3}; DURATION=${DURATION:-5}
run() { # arm binary [env...]
  local arm=$1 bin=$2; shift 2
  env "$@" "$BENCH" --server-bin "$bin" --phases health,register,get --health-again \
    -d "$DURATION" --warmup 1 --json "$OUT/$arm-$r.json" > "$OUT/$arm-$r.md" 2> "$OUT/$arm-$r.err"
  grep -E '^\| (health|register|get-by-id) ' "$OUT/$arm-$r.md" | sed "s/^/$arm r$r /"
}
for r in $(seq "$ROUNDS"); do
  if [ $((r % 2)) = 1 ]; then
    run base "$BASE"; run new "$NEW"; run newlog "$NEW" EPR__LOG__LEVEL=info
  else
    run newlog "$NEW" EPR__LOG__LEVEL=info; run new "$NEW"; run base "$BASE"
  fi
done
echo "tables, JSON and server output: $OUT" >&2
