#!/usr/bin/env bash
# Starts (idempotently) a private PostgreSQL for benchmarks, sized like a small production
# server rather than the tests' defaults: shared_buffers 2 GB (the listing side table's
# index at 1,000,000 endpoints is ~1 GB), WAL sized so checkpoints do not run every few
# seconds under write load, durability as shipped (fsync, synchronous_commit on,
# full_page_writes). Prints `export EPR_BENCH_PG_URL=...`.
#   eval "$(scripts/bench-pg.sh)"   stop: scripts/bench-pg.sh stop
set -euo pipefail
DIR=${BENCH_PG_DIR:-${TMPDIR:-/tmp}/epr-bench-pg}
PORT=${BENCH_PG_PORT:-25432}
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
if [ "${1:-}" = stop ]; then
  [ -f "$DIR/data/postmaster.pid" ] && as_pg "$PGBIN/pg_ctl" -D "$DIR/data" -m fast -w stop >&2
  exit 0
fi
mkdir -p "$DIR"
[ "$(id -u)" = 0 ] && chown postgres:postgres "$DIR"
[ -f "$DIR/data/PG_VERSION" ] || \
  as_pg "$PGBIN/initdb" -D "$DIR/data" -U postgres -A trust -E UTF8 --no-instructions >/dev/null
as_pg "$PGBIN/pg_ctl" -D "$DIR/data" status >/dev/null 2>&1 || \
  as_pg "$PGBIN/pg_ctl" -D "$DIR/data" -l "$DIR/pg.log" -w -t 60 -o "\
    -c listen_addresses=127.0.0.1 -p $PORT -k $DIR -c max_connections=200 \
    -c shared_buffers=2GB -c effective_cache_size=8GB -c work_mem=16MB \
    -c max_wal_size=8GB -c checkpoint_timeout=15min -c wal_buffers=64MB \
    -c random_page_cost=1.1" start >/dev/null
"$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" -U postgres
echo "export EPR_BENCH_PG_URL=postgres://postgres@127.0.0.1:$PORT/postgres"
