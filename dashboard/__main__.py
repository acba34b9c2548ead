"""`python -m dashboard`: demo data, local cluster, autoscaler and Streamlit together; stops them on exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from cluster.local import LocalCluster
from jobs.demo import seed_demo

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    port = os.environ.get("EMBEDDECK_DASHBOARD_PORT", "8501")
    print(f"demo data: {seed_demo()} rows in table products")
    cluster = LocalCluster()
    state = cluster.up(workers=0)
    print(f"Spark master {cluster.master_url()} (UI {cluster.master_webui}); {state.alive_workers} workers")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    controller = subprocess.Popen([sys.executable, "-m", "cluster", "autoscale"], cwd=REPO, env=env)
    try:
        return subprocess.call([sys.executable, "-m", "streamlit", "run", str(REPO / "app.py"),
                                "--server.address", "127.0.0.1", "--server.port", port,
                                "--server.headless", "true", "--browser.gatherUsageStats", "false"],
                               cwd=REPO, env=env)
    except KeyboardInterrupt:
        return 0
    finally:
        controller.send_signal(signal.SIGTERM)
        controller.wait(10)
        cluster.down()


if __name__ == "__main__":
    sys.exit(main())
