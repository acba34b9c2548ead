"""`make jupyter` (`python -m jobs.doors.jupyter`): JupyterLab on 127.0.0.1 beside `make run`, whose kernels reach the
same database, registry and cluster (the example notebook launches a run on its run service and searches it).

Its token is never on a command line or in its log: `JUPYTER_TOKEN` when set (at least 24 characters, as the
container demands), else one made once in an owner-only file, which Jupyter reads itself (JUPYTER_TOKEN_FILE)."""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from pathlib import Path

from jobs.core.errors import BadRequest
from jobs.core.processes import port_taken, write_private
from jobs.core.settings import REPO, Settings

MIN_TOKEN_CHARS = 24
EXAMPLES = REPO / "docker" / "notebooks"


def notebooks_dir(settings: Settings) -> Path:
    """Where notebooks are served from, with the examples copied in when missing (never over a user's edits)."""
    folder = Path(settings.raw("EMBEDDECK_NOTEBOOK_DIR") or settings.home / "notebooks")
    folder.mkdir(parents=True, exist_ok=True)
    for example in EXAMPLES.glob("*.ipynb"):
        if not (folder / example.name).exists():
            shutil.copyfile(example, folder / example.name)
    return folder


def main() -> int:
    settings = Settings()
    try:
        settings.check_values()  # the port, and the kernels' runs, read them
    except BadRequest as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    port = settings.integer("EMBEDDECK_JUPYTER_PORT")
    if port_taken(port):
        print(f"error: port {port} is in use (is Jupyter already running?): EMBEDDECK_JUPYTER_PORT picks another",
              file=sys.stderr)
        return 2
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    token = env.get("JUPYTER_TOKEN")
    if token is not None:
        if len(token) < MIN_TOKEN_CHARS or not token.strip():  # the container's rule
            print(f"error: JUPYTER_TOKEN must be at least {MIN_TOKEN_CHARS} characters", file=sys.stderr)
            return 2
        where = "JUPYTER_TOKEN"
    else:
        path = settings.home / "jupyter.token"
        if not path.is_file():
            write_private(path, secrets.token_hex(16))
        env["JUPYTER_TOKEN_FILE"] = where = str(path)
    notebooks = notebooks_dir(settings)
    print(f"JupyterLab on http://127.0.0.1:{port}/lab, serving {notebooks}; its token is in {where} (owner only)",
          flush=True)
    # Root is refused unless told: a CI container or a fresh VM often runs as root, and this server listens on
    # loopback behind its token.
    as_root = ["--allow-root"] if os.geteuid() == 0 else []
    os.execve(sys.executable, [sys.executable, "-m", "jupyter", "lab", "--ip", "127.0.0.1", "--port", str(port),
                               "--no-browser", "--ServerApp.port_retries=0", f"--ServerApp.root_dir={notebooks}",
                               *as_root], env)  # replaces this process: nothing after it runs


if __name__ == "__main__":
    sys.exit(main())
