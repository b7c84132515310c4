#!/usr/bin/env bash
# Stops the private test services started by services-up.sh (by PID / data dir only).
RUN_DIR=${RUN_DIR:-${TMPDIR:-/tmp}/epr-services}
[ -f "$RUN_DIR/nats/pid" ] && kill "$(cat "$RUN_DIR/nats/pid")" 2>/dev/null; rm -f "$RUN_DIR/nats/pid"
PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
if [ -n "$PGBIN" ] && [ -f "$RUN_DIR/pg/data/postmaster.pid" ]; then
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$PGBIN/pg_ctl" -D "$RUN_DIR/pg/data" -m fast -w stop
  else "$PGBIN/pg_ctl" -D "$RUN_DIR/pg/data" -m fast -w stop; fi
fi
true
