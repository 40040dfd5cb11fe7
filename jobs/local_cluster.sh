#!/usr/bin/env bash
# A two-node Ray cluster on this machine: a head and a second node, each its own `ray start`
# process (own raylet, object store and resources, --num-cpus=1 each). Use it to try
# multi-node runs (workers on both nodes) without a second machine.
#
#   jobs/local_cluster.sh start            # prints RAY_ADDRESS and the dashboard URL
#   jobs/local_cluster.sh status
#   jobs/local_cluster.sh submit -- rrscale tune search_spaces/quickstart.yaml --set scaling.num_workers=2
#   jobs/local_cluster.sh stop             # ends exactly the processes this script started
#
# Settings (environment):
#   RRSCALE_CLUSTER_DIR   state + Ray temp dir (default /tmp/rrscale-cluster; keep it short:
#                         Unix socket paths must stay under 108 bytes)
#   RRSCALE_GCS_PORT      head GCS port (default 46379; keep it outside Ray's worker port
#                         range 10002-19999)
#   RRSCALE_DASHBOARD_PORT  dashboard port on 127.0.0.1 (default 8265)
#   RRSCALE_NODE_CPUS     CPUs per node (default 1)
#   RAY_AUTH_MODE         token (default) or disabled. With token auth the token comes from
#                         RAY_AUTH_TOKEN, else ~/.ray/auth_token (created when missing); both
#                         nodes and every client (ray job submit, the dashboard) need the same one.
#
# `stop` never runs `ray stop` (that would end every Ray on the machine, other users' too):
# every process started here carries RRSCALE_CLUSTER_ID=<id> in its environment, and stop
# ends exactly those pids.
set -euo pipefail

DIR="${RRSCALE_CLUSTER_DIR:-/tmp/rrscale-cluster}"
GCS_PORT="${RRSCALE_GCS_PORT:-46379}"
DASH_PORT="${RRSCALE_DASHBOARD_PORT:-8265}"
CPUS="${RRSCALE_NODE_CPUS:-1}"
RAY="${RAY:-ray}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"
export RAY_TMPDIR="$DIR"

cluster_pids() {
  # Pids of this cluster's processes, never by name (Ray renames its processes and may
  # overwrite their command line and environment with the new title): a process belongs to
  # the cluster when its environment holds the cluster id or it has a file open under $DIR
  # (every Ray process of the cluster keeps its log files in $DIR/ray/session_*/logs).
  local id
  id="$(cat "$DIR/cluster_id" 2>/dev/null || true)"
  [ -n "$id" ] || return 0
  for proc in /proc/[0-9]*; do
    pid="${proc#/proc/}"
    [ "$pid" != "$$" ] && [ "$pid" != "$BASHPID" ] || continue
    if tr '\0' '\n' < "$proc/environ" 2>/dev/null | grep -qx "RRSCALE_CLUSTER_ID=$id" \
       || ls -l "$proc/fd" 2>/dev/null | grep -q -- "-> $DIR/ray/"; then
      echo "$pid"
    fi
  done
}

ensure_token() {
  if [ "$RAY_AUTH_MODE" = "token" ] && [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -s "$HOME/.ray/auth_token" ]; then
    "$RAY" get-auth-token --generate >/dev/null
    echo "generated a Ray token in ~/.ray/auth_token"
  fi
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
  if [ -n "$(cluster_pids)" ]; then
    echo "a cluster from $DIR is already running (jobs/local_cluster.sh stop first)" >&2
    exit 1
  fi
  mkdir -p "$DIR"
  ensure_token
  local id
  id="rrscale-$(date +%s)-$$"
  echo "$id" > "$DIR/cluster_id"
  export RRSCALE_CLUSTER_ID="$id"
  # head: GCS, dashboard (127.0.0.1 only), its own raylet
  "$RAY" start --head --num-cpus="$CPUS" --port="$GCS_PORT" \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASH_PORT" \
    --dashboard-agent-listen-port="$(free_port)" --ray-client-server-port="$(free_port)" \
    --disable-usage-stats >"$DIR/head.log" 2>&1 || { cat "$DIR/head.log" >&2; exit 1; }
  # second node: a separate raylet joining the head (its agent needs another port on this host)
  "$RAY" start --address="127.0.0.1:$GCS_PORT" --num-cpus="$CPUS" \
    --dashboard-agent-listen-port="$(free_port)" >"$DIR/node2.log" 2>&1 || { cat "$DIR/node2.log" >&2; exit 1; }
  # wait until the autoscaler reports both nodes (the second registers a moment later)
  local n=0
  for _ in $(seq 1 60); do
    n="$("$RAY" status --address "127.0.0.1:$GCS_PORT" 2>/dev/null \
         | awk '/^Active:/{f=1; next} /^Pending:/{f=0} f && /node_/{c++} END{print c+0}')"
    [ "$n" -ge 2 ] && break
    sleep 1
  done
  if [ "$n" -lt 2 ]; then
    echo "the second node did not join within 60 s (see $DIR/node2.log)" >&2
    exit 1
  fi
  echo "127.0.0.1:$GCS_PORT" > "$DIR/address"
  echo "http://127.0.0.1:$DASH_PORT" > "$DIR/dashboard"
  echo "cluster up: 2 nodes x $CPUS CPU"
  echo "  export RAY_ADDRESS=127.0.0.1:$GCS_PORT      # rrscale joins it (ray.init(address=...))"
  echo "  dashboard + job API: http://127.0.0.1:$DASH_PORT (token: ray get-auth-token)"
}

status() {
  "$RAY" status --address "127.0.0.1:$GCS_PORT"
}

submit() {
  # jobs/local_cluster.sh submit -- CMD...: `ray job submit` with this checkout on PYTHONPATH
  local repo
  repo="$(cd "$(dirname "$0")/.." && pwd)"
  [ "${1:-}" = "--" ] && shift
  "$RAY" job submit --address "http://127.0.0.1:$DASH_PORT" \
    --runtime-env-json "{\"env_vars\": {\"PYTHONPATH\": \"$repo\"}}" -- "$@"
}

stop() {
  local pids
  pids="$(cluster_pids)"
  if [ -z "$pids" ]; then
    echo "no cluster processes from $DIR"
    return 0
  fi
  # shellcheck disable=SC2086
  kill $pids 2>/dev/null || true
  for _ in $(seq 1 20); do
    [ -z "$(cluster_pids)" ] && break
    sleep 0.5
  done
  pids="$(cluster_pids)"
  # shellcheck disable=SC2086
  [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
  echo "cluster stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  submit) shift; submit "$@" ;;
  *) echo "usage: $0 start|status|submit -- CMD...|stop" >&2; exit 2 ;;
esac
