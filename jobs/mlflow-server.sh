#!/usr/bin/env bash
# An MLflow tracking server for team / multi-node sweeps: Postgres for runs, a shared artifact
# store (S3/GCS/MinIO URI or a shared filesystem path) served through the server, so clients
# (the Tune driver, `rrscale runs`, the UI) need only HTTP. No Docker required.
#
#   jobs/mlflow-server.sh postgres    # optional: a local Postgres in $MLFLOW_PGDATA (initdb + pg_ctl)
#   jobs/mlflow-server.sh create-db   # role + database `mlflow` on $MLFLOW_PG_HOST (psql)
#   jobs/mlflow-server.sh start       # mlflow server in the background (pid + log in $MLFLOW_STATE)
#   jobs/mlflow-server.sh status | stop
#
#   export MLFLOW_TRACKING_URI=http://<this-host>:5000     # then rrscale tune / rrscale runs
#
# Needs on the server host: pip install "psycopg2-binary>=2.9" (Postgres driver) and, for an S3
# artifact store, boto3 (+ AWS credentials). Neither is an rrscale dependency: clients only
# talk HTTP. Settings (environment, defaults in brackets):
#   MLFLOW_PG_HOST [127.0.0.1]  MLFLOW_PG_PORT [5432]  MLFLOW_PG_USER [mlflow]
#   MLFLOW_PG_PASSWORD [required for create-db/start unless MLFLOW_DB_URI is given]
#   MLFLOW_DB_URI    full backend URI [postgresql+psycopg2://USER:PASSWORD@HOST:PORT/mlflow]
#   MLFLOW_ARTIFACTS artifact destination every client writes through the server
#                    [/srv/mlflow/artifacts; s3://bucket/mlflow for S3/MinIO (MLFLOW_S3_ENDPOINT_URL)]
#   MLFLOW_HOST [127.0.0.1]   0.0.0.0 to serve other nodes: then put it behind a firewall or
#                             TLS proxy and consider --app-name basic-auth (MLFLOW_BASIC_AUTH=1)
#   MLFLOW_PORT [5000]  MLFLOW_WORKERS [4]  MLFLOW_ALLOWED_HOSTS [host names clients use]
#   MLFLOW_STATE [~/.rrscale/mlflow-server]  MLFLOW_PGDATA [$MLFLOW_STATE/pgdata]
set -euo pipefail

STATE="${MLFLOW_STATE:-$HOME/.rrscale/mlflow-server}"
PG_HOST="${MLFLOW_PG_HOST:-127.0.0.1}"
PG_PORT="${MLFLOW_PG_PORT:-5432}"
PG_USER="${MLFLOW_PG_USER:-mlflow}"
PGDATA_DIR="${MLFLOW_PGDATA:-$STATE/pgdata}"
HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"
WORKERS="${MLFLOW_WORKERS:-4}"
ARTIFACTS="${MLFLOW_ARTIFACTS:-/srv/mlflow/artifacts}"
MLFLOW="${MLFLOW:-mlflow}"
export MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}"
mkdir -p "$STATE"

db_uri() {
  if [ -n "${MLFLOW_DB_URI:-}" ]; then
    echo "$MLFLOW_DB_URI"
    return
  fi
  : "${MLFLOW_PG_PASSWORD:?set MLFLOW_PG_PASSWORD (or MLFLOW_DB_URI)}"
  echo "postgresql+psycopg2://$PG_USER:$MLFLOW_PG_PASSWORD@$PG_HOST:$PG_PORT/mlflow"
}

postgres() {
  # A private Postgres cluster for a single-host setup; skip it when you have a managed one.
  if [ ! -s "$PGDATA_DIR/PG_VERSION" ]; then
    initdb -D "$PGDATA_DIR" -A scram-sha-256 -U postgres --pwfile=<(echo "${MLFLOW_PG_SUPERPASSWORD:?set MLFLOW_PG_SUPERPASSWORD}") >/dev/null
  fi
  pg_ctl -D "$PGDATA_DIR" -l "$STATE/postgres.log" -o "-p $PG_PORT -k $STATE -c listen_addresses=$PG_HOST" -w start
}

create_db() {
  : "${MLFLOW_PG_PASSWORD:?set MLFLOW_PG_PASSWORD}"
  export PGPASSWORD="${MLFLOW_PG_SUPERPASSWORD:-${PGPASSWORD:-}}"
  psql -h "$PG_HOST" -p "$PG_PORT" -U "${MLFLOW_PG_SUPERUSER:-postgres}" -v ON_ERROR_STOP=1 -q <<SQL
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_USER') THEN
    CREATE ROLE $PG_USER LOGIN PASSWORD '$MLFLOW_PG_PASSWORD';
  END IF;
END \$\$;
SELECT 'CREATE DATABASE mlflow OWNER $PG_USER' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'mlflow')\gexec
SQL
  echo "database mlflow ready on $PG_HOST:$PG_PORT (owner $PG_USER)"
}

start() {
  if [ -s "$STATE/server.pid" ] && kill -0 "$(cat "$STATE/server.pid")" 2>/dev/null; then
    echo "already running (pid $(cat "$STATE/server.pid"))"
    return 0
  fi
  case "$ARTIFACTS" in
    *://*) ;;
    *) mkdir -p "$ARTIFACTS" ;;
  esac
  local args=(server --backend-store-uri "$(db_uri)" --artifacts-destination "$ARTIFACTS" --serve-artifacts
              --host "$HOST" --port "$PORT" --workers "$WORKERS")
  [ -n "${MLFLOW_ALLOWED_HOSTS:-}" ] && args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
  [ "${MLFLOW_BASIC_AUTH:-0}" = "1" ] && args+=(--app-name basic-auth)
  # setsid: the server and its workers form their own process group, which `stop` ends.
  setsid "$MLFLOW" "${args[@]}" >"$STATE/server.log" 2>&1 < /dev/null &
  echo $! > "$STATE/server.pid"
  for _ in $(seq 1 60); do
    if python3 - "$HOST" "$PORT" <<'PY' 2>/dev/null; then
import sys, urllib.request
host = "127.0.0.1" if sys.argv[1] == "0.0.0.0" else sys.argv[1]
urllib.request.urlopen(f"http://{host}:{sys.argv[2]}/health", timeout=2)
PY
      echo "mlflow server up: http://$HOST:$PORT (pid $(cat "$STATE/server.pid"), log $STATE/server.log)"
      echo "  export MLFLOW_TRACKING_URI=http://$HOST:$PORT"
      return 0
    fi
    kill -0 "$(cat "$STATE/server.pid")" 2>/dev/null || { tail -20 "$STATE/server.log" >&2; exit 1; }
    sleep 1
  done
  echo "mlflow server did not answer within 60 s; see $STATE/server.log" >&2
  exit 1
}

status() {
  if [ -s "$STATE/server.pid" ] && kill -0 "$(cat "$STATE/server.pid")" 2>/dev/null; then
    echo "running (pid $(cat "$STATE/server.pid")) on http://$HOST:$PORT"
  else
    echo "not running"
  fi
}

stop() {
  [ -s "$STATE/server.pid" ] || { echo "not running"; return 0; }
  local pid
  pid="$(cat "$STATE/server.pid")"
  kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
  rm -f "$STATE/server.pid"
  echo "stopped"
}

case "${1:-}" in
  postgres) postgres ;;
  create-db) create_db ;;
  start) start ;;
  status) status ;;
  stop) stop ;;
  *) echo "usage: $0 postgres|create-db|start|status|stop" >&2; exit 2 ;;
esac
