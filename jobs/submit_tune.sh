#!/usr/bin/env bash
# Submit `rrscale tune` (or any rrscale command) to a running Ray cluster as a Ray job.
#
#   RAY_DASHBOARD=http://127.0.0.1:8265 jobs/submit_tune.sh search_spaces/cifar.yaml --set tune.num_samples=64
#   RAY_DASHBOARD=http://127.0.0.1:8265 RRSCALE_CMD=train jobs/submit_tune.sh exp.yaml --workers 4
#
# The entrypoint runs on the head node, joins the cluster (Ray sets RAY_ADDRESS for it) and
# drives the sweep from there; trials and Train workers are placed on any node. FILE is read
# on the head node: give an absolute path there, or a path inside RRSCALE_WORKING_DIR.
#
# Environment:
#   RAY_DASHBOARD        the head's dashboard / job API (default http://127.0.0.1:8265); with
#                        token auth, RAY_AUTH_TOKEN or ~/.ray/auth_token must hold the cluster's token
#   RRSCALE_CMD          rrscale sub-command (default tune)
#   RRSCALE_STORAGE      shared storage for Tune/Train results: an NFS path mounted at the same
#                        place on every node, or s3://... / gs://... (required for >1 node)
#   MLFLOW_TRACKING_URI  an HTTP MLflow server every node can reach (jobs/mlflow-server.sh);
#                        a sqlite file only works when the driver is the only writer on one node
#   RRSCALE_DATA_ROOT    where the datasets are on every node
#   RRSCALE_WORKING_DIR  upload this folder as the job's working_dir (default: none; rrscale is
#                        expected to be installed on the nodes, e.g. in the image)
set -euo pipefail

[ $# -ge 1 ] || { echo "usage: $0 FILE [rrscale options...]" >&2; exit 2; }
DASHBOARD="${RAY_DASHBOARD:-http://127.0.0.1:8265}"
CMD="${RRSCALE_CMD:-tune}"

env_json="{"
sep=""
for var in MLFLOW_TRACKING_URI RRSCALE_DATA_ROOT RAY_AUTH_MODE; do
  if [ -n "${!var:-}" ]; then
    env_json="$env_json$sep\"$var\": \"${!var}\""
    sep=", "
  fi
done
env_json="$env_json}"
runtime_env="{\"env_vars\": $env_json"
if [ -n "${RRSCALE_WORKING_DIR:-}" ]; then
  runtime_env="$runtime_env, \"working_dir\": \"$RRSCALE_WORKING_DIR\""
fi
runtime_env="$runtime_env}"

extra=()
if [ -n "${RRSCALE_STORAGE:-}" ] && [ "$CMD" = "tune" ]; then
  extra=(--set "tune.storage_path=$RRSCALE_STORAGE")
elif [ -n "${RRSCALE_STORAGE:-}" ] && [ "$CMD" = "train" ]; then
  extra=(--set "scaling.storage_path=$RRSCALE_STORAGE")
fi

exec ray job submit --address "$DASHBOARD" --runtime-env-json "$runtime_env" -- \
  python -m rrscale.cli "$CMD" "$@" "${extra[@]}"
