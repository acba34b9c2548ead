"""A throwaway PostgreSQL server on 127.0.0.1 from Debian's packages, for the tests and `make e2e`."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from jobs.core.processes import free_port


def _bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if found:
        return str(found[-1])
    path = shutil.which(name)
    if not path:
        raise FileNotFoundError(f"PostgreSQL's {name} is not installed")
    return path


_pg_ctl: dict[str, list[str]] = {}  # a running server's pg_ctl command, by its URL


def start(url: str) -> None:
    """Start the server of url (one `server()` started) again; returns once it takes connections."""
    subprocess.run(_pg_ctl[url] + ["start"], check=True, capture_output=True)


def stop(url: str) -> None:
    """Stop the server of url as an operator's restart or a failover does: its sessions are ended."""
    subprocess.run(_pg_ctl[url] + ["-m", "fast", "stop"], check=True, capture_output=True)


@contextmanager
def server() -> Iterator[str]:
    """Start a server with password authentication; yield its SQLAlchemy URL; stop it and remove its files."""
    data = Path(tempfile.mkdtemp(prefix="embeddeck-pg-"))
    port = free_port()
    as_user: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        shutil.chown(data, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    url = ""
    pwfile = data / "pw"
    pwfile.write_text("s3cret-pg\n")
    if as_user:
        shutil.chown(pwfile, "postgres")
    try:
        subprocess.run(as_user + [_bin("initdb"), "-D", str(data / "db"), "-U", "embeddeck", "-A",
                                  "scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8"],
                       check=True, capture_output=True)
        url = f"postgresql+psycopg://embeddeck:s3cret-pg@127.0.0.1:{port}/postgres"
        _pg_ctl[url] = as_user + [_bin("pg_ctl"), "-D", str(data / "db"), "-l", str(data / "log"),
                                  "-o", f"-h 127.0.0.1 -p {port} -k {data}", "-w"]
        start(url)
        yield url
    finally:
        _pg_ctl.pop(url, None)
        if (data / "db" / "postmaster.pid").exists():
            subprocess.run(as_user + [_bin("pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "stop"],
                           capture_output=True)
        shutil.rmtree(data, ignore_errors=True)
