"""`python -m dashboard`: demo data, local cluster, autoscaler and Streamlit together; stops them on exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from cluster import backends
from jobs.core.settings import REPO, Settings
from jobs.spark import run_service
from jobs.store.demo import seed_demo


def main() -> int:
    port = Settings().raw("EMBEDDECK_DASHBOARD_PORT")
    print(f"demo data: {seed_demo()} rows in table products")
    cluster = backends.configured()
    state = cluster.up(workers=0)
    print(f"Spark master {cluster.master_url()} (UI {cluster.master_webui}); {state.alive_workers} workers")
    print(f"run service up (UI {run_service.start(cluster.master_url())['ui_url']}): runs start warm")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # SIGTERM (a service manager, `timeout`) must clean up like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
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
        backends.stop_all(cluster)


if __name__ == "__main__":
    sys.exit(main())
