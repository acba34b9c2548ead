"""`python -m dashboard`: demo data, local cluster, autoscaler and Streamlit together; on exit it stops what
it started."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from cluster import backends
from jobs.core.errors import EmbedDeckError
from jobs.core.processes import exclusive, exit_on_stop_signals, exit_with, port_taken
from jobs.core.settings import REPO, Settings
from jobs.spark import run_service
from jobs.store.demo import seed_demo
from jobs.store.registry import Registry

WATCH_EVERY_S = 2.0
RESTART_AFTER_S = 10.0  # an autoscaler that keeps exiting is started again at most this often
STOP_GRACE_S = 10.0  # how long the autoscaler and Streamlit have to stop before they are killed


def main() -> int:
    try:
        Settings().check_values()  # the port among them
    except EmbedDeckError as exc:
        print(f"error: {exc}; nothing was started", file=sys.stderr)
        return 2
    home = Settings().home  # made by Settings where missing
    # Held while this runs: two `make run` at once both found the port free and the master down, both started the
    # cluster, and the one whose Streamlit then lost the port stopped the cluster the other went on showing.
    with exclusive(home / "make-run.lock", wait=False) as alone:
        if not alone:
            print(f"error: another `make run` is running with this EMBEDDECK_HOME ({home}); nothing was started or "
                  "stopped", file=sys.stderr)
            return 2
        return _run()


def _run() -> int:
    """`make run` once it is the only one on its home."""
    port = Settings().integer("EMBEDDECK_DASHBOARD_PORT")
    # Checked before anything starts: a second `make run` found the port taken only after it had scaled the first
    # one's cluster to 0 workers, and then stopped that cluster on its way out.
    if port_taken(port):
        print(f"error: port {port} is in use (is the dashboard already running?); nothing was started or stopped. "
              "EMBEDDECK_DASHBOARD_PORT picks another port.", file=sys.stderr)
        return 2
    try:
        cluster = backends.configured()
    except EmbedDeckError as exc:  # an unknown backend, or ACA's settings incomplete
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if cluster.name != "local":
        # On ACA the master runs in the controller app, which this cannot start or stop; stopping it on the way
        # out raised a traceback. The deployed dashboard is its own container app.
        print(f"error: make run starts a local cluster, and EMBEDDECK_CLUSTER_BACKEND is {cluster.name!r}: on Azure "
              "Container Apps the dashboard is its own container app (docker/README.md); nothing was started",
              file=sys.stderr)
        return 2
    try:
        print(f"demo data: {seed_demo()} rows in table products")
        Registry()  # answers before anything starts: stopping a cluster cancels its runs there
    except EmbedDeckError as exc:  # a database or registry that does not answer, or a file that is not one
        print(f"error: {exc}; nothing was started", file=sys.stderr)
        return 2
    # SIGTERM (a service manager, `timeout`) and SIGHUP (its terminal closed) must clean up like Ctrl-C does: the
    # cluster's daemons run in sessions of their own, and outlived a closed terminal. Set before the cluster starts:
    # stopped while it started (its first seconds), this left the master and the run service running, with a
    # traceback for Ctrl-C, and the next `make run` took that cluster for one it must leave running. Status 0, as for
    # Ctrl-C: stopping the product is its normal end (make would report 143 as an error).
    exit_on_stop_signals(status=0)
    state = cluster.master_state()
    ours = not state.reachable  # a cluster already up (`python -m cluster up`) is left as it is, and running
    children: dict[str, subprocess.Popen] = {}
    stopping = threading.Event()
    try:
        try:
            state, service = backends.start_all(cluster) if ours else (state, run_service.start(cluster.master_url()))
        except EmbedDeckError as exc:  # a port taken, a master that does not start
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"Spark master {cluster.master_url()} (UI {cluster.master_webui}); {state.alive_workers} workers"
              + ("" if ours else "; it was already running, and keeps running when the dashboard stops"))
        print(f"run service up (UI {service['ui_url']}): runs start warm")
        env = dict(os.environ, PYTHONPATH=str(REPO))
        children["autoscaler"] = _autoscaler(env)
        # The run service is started again when it is gone while the master runs (killed, crashed: the dashboard's
        # runs then went to local[*], off the cluster). A master stopped from the Cluster page stays stopped until
        # Start master.
        threading.Thread(target=run_service.keep, args=(cluster.master_url(), stopping), daemon=True,
                         name="embeddeck-run-service").start()
        children["streamlit"] = subprocess.Popen(
            [sys.executable, "-m", "dashboard.server", "--server.address", "127.0.0.1", "--server.port", str(port)],
            cwd=REPO, env=env)
        return _watch(children, env)
    except KeyboardInterrupt:
        return 0
    finally:
        stopping.set()
        for child in children.values():
            child.terminate()
        for child in children.values():
            try:
                child.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                # Streamlit prints as it stops; where this command's output has gone (`make run | tee` ended), the
                # print raises and its server never stops. Left so, it held the port, and the cluster ran on.
                child.kill()
                child.wait()
        if ours:
            backends.stop_all(cluster)


def _autoscaler(env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cluster", "autoscale"], cwd=REPO, env=env)


def _watch(children: dict[str, subprocess.Popen], env: dict) -> int:
    """Until Streamlit exits (its status is returned): start the autoscaler again when it exits."""
    restarted = 0.0
    while True:
        try:
            return children["streamlit"].wait(WATCH_EVERY_S)
        except subprocess.TimeoutExpired:
            pass
        if children["autoscaler"].poll() is not None and time.monotonic() - restarted > RESTART_AFTER_S:
            print(f"the autoscaler exited with {children['autoscaler'].returncode}; starting it again",
                  file=sys.stderr)
            children["autoscaler"], restarted = _autoscaler(env), time.monotonic()


if __name__ == "__main__":
    exit_with(main)  # a Ctrl-C before the cluster starts (seeding the demo data): 130, no traceback
