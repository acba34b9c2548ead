"""The example notebook executes end to end against the local default (nbclient, a real kernel)."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.spark
REPO = Path(__file__).resolve().parent.parent


def test_example_notebook_runs(tmp_path, monkeypatch):
    from jobs.store.demo import seed_demo

    url = f"sqlite:///{tmp_path / 'nb.sqlite'}"
    seed_demo(url, n=100)  # a configured database is the operator's: the notebook seeds only the embedded demo
    monkeypatch.setenv("EMBEDDECK_DB_URL", url)
    monkeypatch.setenv("EMBEDDECK_NOTEBOOK_ROWS", "60")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    nb = nbformat.read(REPO / "docker" / "notebooks" / "embeddeck_example.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "succeeded 60 rows" in outputs
    assert "boot" in outputs.lower()
    assert os.environ["EMBEDDECK_DB_URL"].endswith("nb.sqlite")


@pytest.mark.server
def test_make_jupyter_serves_the_example_on_loopback_with_a_private_token_and_kernels_reach_our_code(tmp_path):
    """`make jupyter`: JupyterLab on 127.0.0.1 with a token kept in an owner-only file (never on its command line or
    in its output), the example copied into its folder, and kernels that import the product and read its home."""
    import json
    import signal
    import subprocess
    import sys
    import uuid

    import psutil
    import requests
    from websockets.sync.client import connect

    from jobs.core.processes import free_port
    from tests.conftest import arguments_of, wait_until

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("JUPYTER_TOKEN", "PYTHONPATH")}
    env.update(EMBEDDECK_HOME=str(tmp_path), EMBEDDECK_JUPYTER_PORT=str(port), JUPYTER_CONFIG_DIR=str(tmp_path / "cfg"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"), JUPYTER_DATA_DIR=str(tmp_path / "data"))
    log = tmp_path / "jupyter.log"  # a file, not a pipe: Jupyter logs every request, and a full pipe would stall it
    proc = subprocess.Popen([sys.executable, "-m", "jobs.doors.jupyter"], cwd=REPO, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(f"{base}/api/status"), timeout=120, what="JupyterLab")
        token_file = tmp_path / "jupyter.token"
        token = token_file.read_text().strip()
        assert len(token) >= 24 and token_file.stat().st_mode & 0o777 == 0o600
        assert requests.get(f"{base}/api/status", timeout=5).status_code == 403
        auth = {"Authorization": f"token {token}"}
        assert "embeddeck_example.ipynb" in {c["name"] for c in requests.get(
            f"{base}/api/contents", headers=auth, timeout=5).json()["content"]}
        assert all(token not in " ".join(arguments_of(p)) for p in [psutil.Process(proc.pid)]
                   + psutil.Process(proc.pid).children(recursive=True))
        kernel = requests.post(f"{base}/api/kernels", json={"name": "python3"}, headers=auth, timeout=60).json()
        session = uuid.uuid4().hex
        msg_id = uuid.uuid4().hex
        code = ("from jobs import lifecycle; from jobs.core.settings import Settings; "
                "print('home', Settings().home, 'master', lifecycle.resolve_master())")
        with connect(f"ws://127.0.0.1:{port}/api/kernels/{kernel['id']}/channels?token={token}",
                     open_timeout=30) as ws:
            ws.send(json.dumps({"channel": "shell", "buffers": [], "parent_header": {}, "metadata": {},
                                "header": {"msg_id": msg_id, "session": session, "username": "test",
                                           "msg_type": "execute_request", "version": "5.3"},
                                "content": {"code": code, "silent": False, "store_history": False,
                                            "user_expressions": {}, "allow_stdin": False}}))
            printed = []
            while True:
                msg = json.loads(ws.recv(timeout=120))
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                kind = msg["header"]["msg_type"]
                if kind in ("stream", "error"):
                    printed.append(msg["content"].get("text") or str(msg["content"]))
                if kind == "status" and msg["content"]["execution_state"] == "idle":
                    break
        assert f"home {tmp_path} master local[*]" in "".join(printed), printed
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    out = log.read_text()
    assert f"JupyterLab on {base}/lab" in out and token not in out


def _answers(url: str) -> bool:
    import requests

    try:
        return requests.get(url, timeout=2).status_code in (200, 403)
    except requests.RequestException:
        return False
