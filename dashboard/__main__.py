"""`python -m dashboard`: demo data, local cluster, autoscaler and Streamlit together; stops them on exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from cluster.local import LocalCluster
from jobs import runner
from jobs.demo import seed_demo

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    port = os.environ.get("EMBEDDECK_DASHBOARD_PORT", "8501")
    print(f"demo data: {seed_demo()} rows in table products")
    cluster = LocalCluster()
    state = cluster.up(workers=0)
    print(f"Spark master {cluster.master_url()} (UI {cluster.master_webui}); {state.alive_workers} workers")
    print(f"run service up (UI {runner.start(cluster.master_url())['ui_url']}): runs start warm")
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
        runner.stop()
        cluster.down()


if __name__ == "__main__":
    sys.exit(main())
