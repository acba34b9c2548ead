#!/usr/bin/env bash
# One entrypoint for every EmbedDeck container; APP_MODE picks the role.
#   dashboard | trigger | jupyter : controller front doors (each also runs the Spark master)
#   master                       : the Spark standalone master alone
#   worker                       : a Spark worker dialling $SPARK_MASTER_URL, plus its telemetry sidecar
set -euo pipefail
cd "$(dirname "$0")/.."
export SPARK_NO_DAEMONIZE=1 PYTHONPATH="$PWD"
SPARK_CLASS="$(python -c 'import pyspark, os; print(os.path.join(os.path.dirname(pyspark.__file__), "bin", "spark-class"))')"
MASTER_OPTS="--host ${SPARK_MASTER_HOST:-0.0.0.0} --port ${SPARK_MASTER_PORT:-7077} --webui-port ${SPARK_MASTER_WEBUI_PORT:-8080}"
# With the cluster's secret (a secret reference on ACA), daemons admit only applications that hold it.
if [ -n "${_SPARK_AUTH_SECRET:-}" ]; then
  export SPARK_DAEMON_JAVA_OPTS="${SPARK_DAEMON_JAVA_OPTS:-} -Dspark.authenticate=true -Dspark.network.crypto.enabled=true"
fi

start_master() {
  # The REST submission server answers without authentication: keep it off. The master leads a process group of
  # its own (setsid), as the local backend's daemons do, so that its Stop reaches it.
  SPARK_MASTER_OPTS="-Dspark.master.rest.enabled=false" setsid "$SPARK_CLASS" org.apache.spark.deploy.master.Master \
    $MASTER_OPTS &
  master=$!
  # The local backend (the dashboard's Cluster page, `python -m cluster`) knows the masters it holds a record of:
  # without one, the page said "Spark master is down" beside this one and offered to start another.
  export EMBEDDECK_MASTER_PORT="${SPARK_MASTER_PORT:-7077}" EMBEDDECK_MASTER_WEBUI_PORT="${SPARK_MASTER_WEBUI_PORT:-8080}"
  python -c "from cluster.local import LocalCluster; LocalCluster().adopt_master($master)"
}

keep_run_service() {
  # One long-lived driver on the fixed driver ports: runs start warm on its executors, and two
  # concurrent runs never race for those ports (a spark-submit per run would). Started once the
  # master answers, and again whenever it is gone while the master runs.
  python -c 'import logging; from jobs.core.settings import Settings; from jobs.spark import run_service
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
run_service.keep(Settings().raw("EMBEDDECK_SPARK_MASTER") or "spark://127.0.0.1:7077")' &
  keeper=$!
}

serve_beside_master() {
  # The front door runs beside the master, and the container ends when either does, so that Container Apps
  # starts the replica again: with the door exec'd, a dead master left the API answering 503 to every run, and
  # the platform's probes, which reach the door, found the replica healthy.
  "$@" &
  door=$!
  stopping=""
  trap 'stopping=1' TERM INT
  status=0
  wait -n "$master" "$door" || status=$?
  if [ -n "$stopping" ]; then
    status=0
  elif ! kill -0 "$master" 2>/dev/null; then
    echo "the Spark master exited; stopping the container so that it is started again" >&2
    status=1
  fi
  kill -TERM "$door" "$master" "$keeper" 2>/dev/null || true
  wait "$door" "$master" "$keeper" 2>/dev/null || true
  exit "$status"
}

case "${APP_MODE:-dashboard}" in
  master)
    SPARK_MASTER_OPTS="-Dspark.master.rest.enabled=false" exec "$SPARK_CLASS" org.apache.spark.deploy.master.Master $MASTER_OPTS
    ;;
  worker)
    : "${SPARK_MASTER_URL:?set SPARK_MASTER_URL, e.g. spark://embeddeck-controller:7077}"
    # The work directory must be the runtime user's: pyspark's own (in site-packages) is root's.
    work_dir="${SPARK_WORKER_DIR:-$HOME/spark-work}"
    mkdir -p "$work_dir"
    "$SPARK_CLASS" org.apache.spark.deploy.worker.Worker "$SPARK_MASTER_URL" --work-dir "$work_dir" \
      --cores "${SPARK_WORKER_CORES:-$(nproc)}" --memory "${SPARK_WORKER_MEMORY:-16g}" &
    worker=$!
    python -m cluster.telemetry --worker "${HOSTNAME:-worker}" --pid "$worker" &
    sidecar=$!
    # As the container's PID 1, bash ignores a SIGTERM it has no trap for: each stop at scale-in waited out
    # the grace period (30 s of a GPU replica, billed) until SIGKILL. The worker and its sidecar get it instead.
    trap 'kill -TERM "$worker" "$sidecar" 2>/dev/null || true' TERM INT
    status=0
    wait "$worker" || status=$?
    wait "$worker" 2>/dev/null || true  # after a TERM, until the worker has stopped
    kill -TERM "$sidecar" 2>/dev/null || true
    exit "$status"
    ;;
  dashboard)
    # The dashboard is the whole control plane and Streamlit has no sign-in of its own: it is served beyond
    # loopback only behind authentication (docker/README.md, "Reaching the dashboard").
    address="${DASHBOARD_ADDRESS:-0.0.0.0}"
    case "${EMBEDDECK_DASHBOARD_AUTH:-none}" in
      proxy|oidc) ;;
      none)
        case "$address" in
          127.0.0.1|localhost|::1) ;;
          *) echo "refusing to serve the dashboard on $address without authentication: set" \
                  "EMBEDDECK_DASHBOARD_AUTH=proxy (behind ACA's built-in authentication) or oidc (st.login)" >&2
             exit 2 ;;
        esac ;;
      *) echo "EMBEDDECK_DASHBOARD_AUTH must be none, proxy or oidc" >&2; exit 2 ;;
    esac
    case "${EMBEDDECK_SPARK_MASTER:-}" in
      ""|spark://127.0.0.1*|spark://localhost*)
        start_master
        keep_run_service
        serve_beside_master python -m dashboard.server --server.address "$address" --server.port "${EMBEDDECK_DASHBOARD_PORT:-8501}"
        ;;
    esac
    # The controller's master (the deployed dashboard app): runs launched here drive from here.
    exec python -m dashboard.server --server.address "$address" --server.port "${EMBEDDECK_DASHBOARD_PORT:-8501}"
    ;;
  trigger)
    start_master
    keep_run_service
    serve_beside_master python -m jobs serve --host "${API_ADDRESS:-0.0.0.0}" --port "${EMBEDDECK_API_PORT:-8888}"
    ;;
  jupyter)
    : "${JUPYTER_TOKEN:?set JUPYTER_TOKEN: Jupyter never runs without a token}"
    if [ "${#JUPYTER_TOKEN}" -lt 24 ] || [ -z "${JUPYTER_TOKEN//[[:space:]]/}" ]; then
      echo "JUPYTER_TOKEN must be at least 24 characters (e.g. python -c 'import secrets; print(secrets.token_hex(16))')" >&2
      exit 2
    fi
    # Notebooks on the share outlive a revision: the example is copied there once, never over a user's.
    notebooks="${EMBEDDECK_NOTEBOOK_DIR:-${EMBEDDECK_HOME:-$PWD/var}/notebooks}"
    mkdir -p "$notebooks"
    cp -n "$PWD"/docker/notebooks/*.ipynb "$notebooks"/ 2>/dev/null || true
    start_master
    keep_run_service
    # Jupyter reads JUPYTER_TOKEN itself: on its command line the token showed in every process listing.
    serve_beside_master jupyter lab --ip 0.0.0.0 --port 8888 --no-browser --allow-root \
      --ServerApp.disable_check_xsrf=False --ServerApp.root_dir="$notebooks"
    ;;
  *)
    echo "APP_MODE must be dashboard, trigger, jupyter, master or worker, not '${APP_MODE}'" >&2
    exit 2
    ;;
esac
