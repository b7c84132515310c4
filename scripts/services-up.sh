#!/usr/bin/env bash
# Installs (when absent) and starts private nats-server (JetStream) and PostgreSQL
# instances on loopback for the tests, idempotently. Prints the URLs as shell exports;
# `eval "$(scripts/services-up.sh)"` or `source` it.
# They run on their own ports with data in $RUN_DIR, so they never touch system services.
set -euo pipefail
RUN_DIR=${RUN_DIR:-${TMPDIR:-/tmp}/epr-services}
NATS_PORT=${NATS_PORT:-14222}; NATS_MON=${NATS_MON:-18222}; PG_PORT=${PG_PORT:-15432}
mkdir -p "$RUN_DIR/nats/js" "$RUN_DIR/pg"

need=()
command -v nats-server >/dev/null || need+=(nats-server)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v curl >/dev/null || need+=(curl)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "installing ${need[*]}" >&2
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >&2
fi
NATS_BIN=${NATS_BIN:-$(command -v nats-server || echo /usr/sbin/nats-server)}

# nats-server with JetStream
if ! { [ -f "$RUN_DIR/nats/pid" ] && kill -0 "$(cat "$RUN_DIR/nats/pid")" 2>/dev/null; }; then
  nohup "$NATS_BIN" -a 127.0.0.1 -p "$NATS_PORT" -m "$NATS_MON" -js -sd "$RUN_DIR/nats/js" \
        -P "$RUN_DIR/nats/pid" -l "$RUN_DIR/nats/nats.log" >/dev/null 2>&1 &
fi
for _ in $(seq 100); do
  curl -fsS "http://127.0.0.1:$NATS_MON/healthz?js-enabled-only=true" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS "http://127.0.0.1:$NATS_MON/healthz?js-enabled-only=true" >/dev/null

# PostgreSQL cluster (initdb refuses to run as root, hence runuser)
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" = 0 ] && chown postgres:postgres "$RUN_DIR/pg"
[ -f "$RUN_DIR/pg/data/PG_VERSION" ] || \
  as_pg "$PGBIN/initdb" -D "$RUN_DIR/pg/data" -U postgres -A trust -E UTF8 --no-instructions >/dev/null
as_pg "$PGBIN/pg_ctl" -D "$RUN_DIR/pg/data" status >/dev/null 2>&1 || \
  as_pg "$PGBIN/pg_ctl" -D "$RUN_DIR/pg/data" -l "$RUN_DIR/pg/pg.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $RUN_DIR/pg -c max_connections=200" start >/dev/null
"$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -U postgres

# The real OpenID provider of the end-to-end authentication tests (npm `oidc-provider`,
# pinned by its package-lock.json).
OIDC_DIR="$(cd "$(dirname "$0")/.." && pwd)/crates/epr-server/tests/oidc"
if [ ! -f "$OIDC_DIR/node_modules/oidc-provider/package.json" ]; then
  (cd "$OIDC_DIR" && npm ci --no-audit --no-fund --loglevel=error >&2)
fi

echo "export EPR_TEST_NATS_URL=nats://127.0.0.1:$NATS_PORT"
# Tests that stop and restart a broker (outage, crash) start their own from this binary.
echo "export EPR_TEST_NATS_BIN=$NATS_BIN"
echo "export EPR_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:$PG_PORT/postgres"
echo "export EPR_TEST_OIDC_PROVIDER=$OIDC_DIR/provider.mjs"
