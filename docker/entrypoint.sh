#!/usr/bin/env bash
# One entrypoint for every EmbedDeck container; APP_MODE picks the role.
#   dashboard | trigger | jupyter : controller front doors (each also runs the Spark master)
#   master                       : the Spark standalone master alone
#   worker                       : a Spark worker dialling $SPARK_MASTER_URL, plus its telemetry sidecar
set -euo pipefail
cd "$(dirname "$0")/.."
export SPARK_NO_DAEMONIZE=1 PYTHONPATH="$PWD"
SPARK_CLASS="$(python -c 'import pyspark, os; print(os.path.join(os.path.dirname(pyspark.__file__), "bin", "spark-class"))')"
MASTER_OPTS="--host 0.0.0.0 --port ${SPARK_MASTER_PORT:-7077} --webui-port ${SPARK_MASTER_WEBUI_PORT:-8080}"

start_master() {
  # The REST submission server answers without authentication: keep it off.
  SPARK_MASTER_OPTS="-Dspark.master.rest.enabled=false" "$SPARK_CLASS" org.apache.spark.deploy.master.Master $MASTER_OPTS &
}

start_run_service() {
  # One long-lived driver on the fixed driver ports: runs start warm on its executors, and two
  # concurrent runs never race for those ports (a spark-submit per run would).
  python -c 'from jobs.core.settings import Settings; from jobs.spark import run_service
run_service.start(Settings().raw("EMBEDDECK_SPARK_MASTER") or "spark://127.0.0.1:7077")' &
}

case "${APP_MODE:-dashboard}" in
  master)
    SPARK_MASTER_OPTS="-Dspark.master.rest.enabled=false" exec "$SPARK_CLASS" org.apache.spark.deploy.master.Master $MASTER_OPTS
    ;;
  worker)
    : "${SPARK_MASTER_URL:?set SPARK_MASTER_URL, e.g. spark://embeddeck-controller:7077}"
    "$SPARK_CLASS" org.apache.spark.deploy.worker.Worker "$SPARK_MASTER_URL" \
      --cores "${SPARK_WORKER_CORES:-$(nproc)}" --memory "${SPARK_WORKER_MEMORY:-16g}" &
    worker=$!
    python -m cluster.telemetry --worker "${HOSTNAME:-worker}" --pid "$worker" &
    wait "$worker"
    ;;
  dashboard)
    start_master
    start_run_service
    exec streamlit run app.py --server.address 0.0.0.0 --server.port 8501 --server.headless true \
      --browser.gatherUsageStats false
    ;;
  trigger)
    start_master
    start_run_service
    exec python -m jobs serve --host 0.0.0.0 --port 8888
    ;;
  jupyter)
    : "${JUPYTER_TOKEN:?set JUPYTER_TOKEN: Jupyter never runs without a token}"
    start_master
    start_run_service
    exec jupyter lab --ip 0.0.0.0 --port 8888 --no-browser --allow-root \
      --IdentityProvider.token="$JUPYTER_TOKEN" --ServerApp.disable_check_xsrf=False \
      --ServerApp.root_dir="$PWD/docker/notebooks"
    ;;
  *)
    echo "APP_MODE must be dashboard, trigger, jupyter, master or worker, not '${APP_MODE}'" >&2
    exit 2
    ;;
esac
