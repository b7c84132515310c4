#!/usr/bin/env bash
# Property-based API tests: runs Schemathesis (every check) against a freshly started
# `epr` server, driven by the server's own /openapi.json. Fails on any failure.
#
# Idempotent: Schemathesis (pinned) is installed once into a virtualenv under $RUN_DIR;
# python3-venv is installed with apt when the machine lacks it. Bounded: the run stops
# after SCHEMATHESIS_MAX_TIME seconds (default 90). Can be run alone:
#   scripts/schemathesis.sh            # builds the debug binary if needed
#   EPR_BIN=target/release/epr scripts/schemathesis.sh
# Check configuration (and the reason for each relaxation) is in scripts/schemathesis.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUN_DIR=${RUN_DIR:-${TMPDIR:-/tmp}/epr-services}
SCHEMATHESIS_VERSION=4.32.5
VENV="$RUN_DIR/schemathesis-$SCHEMATHESIS_VERSION"
MAX_TIME=${SCHEMATHESIS_MAX_TIME:-90}
mkdir -p "$RUN_DIR"

# --- Schemathesis, pinned, in its own virtualenv
if ! "$VENV/bin/st" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
  if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    echo "installing python3-venv" >&2
    $SUDO apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >&2
  fi
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

# --- The server: a fresh data directory, a free loopback port
EPR_BIN=${EPR_BIN:-}
if [ -z "$EPR_BIN" ]; then
  cargo build -q -p epr-server --bin epr --locked
  EPR_BIN="$ROOT/target/debug/epr"
fi
WORK=$(mktemp -d "$RUN_DIR/schemathesis-run.XXXXXX")
EPR_PID=""
cleanup() {
  if [ -n "$EPR_PID" ]; then kill "$EPR_PID" 2>/dev/null || true; wait "$EPR_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
BASE="http://127.0.0.1:$PORT"
cat > "$WORK/epr.yaml" <<EOF
server:
  listen: 127.0.0.1:$PORT
store:
  data_dir: $WORK/data
log:
  level: warn
kaa:
  applications:
    example_app:
      versions:
        example_app-v1: {}
        example_app-v2: {}
# The device routes' per-address limit would answer most generated requests 429 (they all
# come from 127.0.0.1), leaving the logic behind it untested; the limits have their own
# black-box tests (tests/api/self_registration.rs).
self_registration:
  rate_limit:
    per_source_per_minute: 0
    per_claim_per_minute: 0
EOF
# Without NATS (no nats.url): the API is the same, events are simply not recorded.
env -u EPR_APPLICATIONS "$EPR_BIN" --config "$WORK/epr.yaml" >"$WORK/epr.log" 2>&1 &
EPR_PID=$!
ready() { python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' "$BASE/health/ready" 2>/dev/null; }
for _ in $(seq 100); do
  ready && break
  kill -0 "$EPR_PID" 2>/dev/null || { cat "$WORK/epr.log" >&2; exit 1; }
  sleep 0.1
done
ready || { echo "epr did not become ready" >&2; cat "$WORK/epr.log" >&2; exit 1; }

# --- The run: every check, every phase, a fixed seed (reproducible), a time budget
echo "== schemathesis $SCHEMATHESIS_VERSION against $BASE (at most ${MAX_TIME}s)"
status=0
timeout $((MAX_TIME + 60)) "$VENV/bin/st" --config-file "$ROOT/scripts/schemathesis.toml" run \
  "$BASE/openapi.json" \
  --checks all \
  --max-time "$MAX_TIME" \
  --seed "${SCHEMATHESIS_SEED:-20261206}" \
  --workers 1 \
  --generation-database none \
  --no-color || status=$?
if [ "$status" != 0 ]; then
  echo "schemathesis failed (exit $status); server log:" >&2
  tail -n 50 "$WORK/epr.log" >&2
fi
exit "$status"
