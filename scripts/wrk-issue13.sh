#!/usr/bin/env bash
# Issue 13's original measurement with wrk (`wrk -t2 -c64 -d10s --latency`) against one
# release server on a fresh data directory: /health/live (the ceiling), registrations with
# the five-key mix (scripts/wrk/register.lua), then get by id over GET_ENDPOINTS endpoints
# registered through the batch API (scripts/wrk/get.lua).
#   scripts/wrk-issue13.sh [EPR]   (default target/release/epr; copy it out of target/)
# THREADS (2), CONNS (64), DURATION (10s), GET_ENDPOINTS (10000). epr-bench's `mix` phase
# measures the same sequence (and the filters) with its own client: see
# crates/epr-bench/README.md.
set -euo pipefail
BIN=${1:-target/release/epr}
THREADS=${THREADS:-2}; CONNS=${CONNS:-64}; DURATION=${DURATION:-10s}
GET_ENDPOINTS=${GET_ENDPOINTS:-10000}
here=$(cd "$(dirname "$0")" && pwd)/wrk
command -v wrk >/dev/null || { echo "wrk not found (apt-get install wrk)" >&2; exit 1; }
dir=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# The application and version the scripts use, as epr-bench's spawned servers have them.
cat > "$dir/config.yaml" <<YAML
kaa:
  applications:
    mix:
      versions:
        mix-v1: {}
log:
  level: warn
YAML
mkdir "$dir/data"
"$BIN" --config "$dir/config.yaml" --listen "127.0.0.1:$port" --data-dir "$dir/data" \
  </dev/null >"$dir/server.log" 2>&1 &
pid=$!
url=http://127.0.0.1:$port
for _ in $(seq 300); do curl -fs "$url/health/live" >/dev/null && break; sleep 0.1; done
curl -fs "$url/health/live" >/dev/null || { cat "$dir/server.log" >&2; exit 1; }
w() { wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency "$@"; }

echo "## GET /health/live"; w "$url/health/live"
echo; echo "## POST /api/v1/endpoints (five-key mix)"
WRK_RUN=$(date +%s) w -s "$here/register.lua" "$url" -- mix-v1
# Endpoints g-0 .. g-(GET_ENDPOINTS-1) for the get-by-id run, 1000 per batch request.
for ((lo = 0; lo < GET_ENDPOINTS; lo += 1000)); do
  hi=$((lo + 1000 < GET_ENDPOINTS ? lo + 1000 : GET_ENDPOINTS))
  body='{"appVersion":{"name":"mix-v1"},"endpoints":['
  for ((i = lo; i < hi; i++)); do
    body+="{\"endpointId\":\"g-$i\",\"metadata\":{\"city\":\"c$((i % 40))\",\"level\":$((i % 50))}}"
    [ $((i + 1)) -lt "$hi" ] && body+=','
  done
  body+=']}'
  code=$(curl -s -o /dev/null -w '%{http_code}' -H 'Content-Type: application/json' \
    --data-binary "$body" "$url/api/v1/endpoints/batch")
  [ "$code" = 202 ] || { echo "batch registration: HTTP $code" >&2; exit 1; }
done
echo; echo "## GET /api/v1/endpoints/{id} ($GET_ENDPOINTS endpoints)"
w -s "$here/get.lua" "$url" -- g "$GET_ENDPOINTS"
