"""`python -m dashboard`: demo data, local cluster, autoscaler and Streamlit together; on exit it stops what
it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from cluster import backends
from jobs.core.errors import EmbedDeckError
from jobs.core.processes import port_taken
from jobs.core.settings import REPO, Settings
from jobs.spark import run_service
from jobs.store.demo import seed_demo


def main() -> int:
    port = Settings().raw("EMBEDDECK_DASHBOARD_PORT")
    # Checked before anything starts: a second `make run` found the port taken only after it had scaled the first
    # one's cluster to 0 workers, and then stopped that cluster on its way out.
    if port_taken(int(port)):
        print(f"error: port {port} is in use (is the dashboard already running?); nothing was started or stopped. "
              "EMBEDDECK_DASHBOARD_PORT picks another port.", file=sys.stderr)
        return 2
    print(f"demo data: {seed_demo()} rows in table products")
    cluster = backends.configured()
    state = cluster.master_state()
    ours = not state.reachable  # a cluster already up (`python -m cluster up`) is left as it is, and running
    try:
        if ours:
            state = cluster.up(workers=0)
        print(f"Spark master {cluster.master_url()} (UI {cluster.master_webui}); {state.alive_workers} workers"
              + ("" if ours else "; it was already running, and keeps running when the dashboard stops"))
        print(f"run service up (UI {run_service.start(cluster.master_url())['ui_url']}): runs start warm")
    except EmbedDeckError as exc:  # a port taken, a master that does not start
        print(f"error: {exc}", file=sys.stderr)
        if ours:
            backends.stop_all(cluster)
        return 2
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # SIGTERM (a service manager, `timeout`) and SIGHUP (its terminal closed) must clean up like Ctrl-C does: the
    # cluster's daemons run in sessions of their own, and outlived a closed terminal.
    for stop in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop, lambda *_: sys.exit(0))
    children = [subprocess.Popen([sys.executable, "-m", "cluster", "autoscale"], cwd=REPO, env=env)]
    try:
        children.append(subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(REPO / "app.py"), "--server.address", "127.0.0.1",
             "--server.port", port, "--server.headless", "true", "--browser.gatherUsageStats", "false"],
            cwd=REPO, env=env))
        return children[-1].wait()
    except KeyboardInterrupt:
        return 0
    finally:
        for child in children:
            child.terminate()
        for child in children:
            child.wait(10)
        if ours:
            backends.stop_all(cluster)


if __name__ == "__main__":
    sys.exit(main())
