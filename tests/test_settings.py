"""One Settings object: every EMBEDDECK_* variable the code, images and notebook name is declared once,
with its default and meaning, and the README's table is that declaration."""

import re
from pathlib import Path

import pytest

from jobs.core.errors import BadRequest
from jobs.core.settings import VARIABLES, Settings, markdown_table, size_mib

REPO = Path(__file__).resolve().parent.parent
SOURCES = [*REPO.glob("jobs/**/*.py"), *REPO.glob("cluster/*.py"), *REPO.glob("dashboard/*.py"),
           *REPO.glob("pages/*.py"), REPO / "app.py", *REPO.glob("docker/*"), *REPO.glob("docker/notebooks/*")]


def test_every_variable_named_anywhere_is_declared():
    named = set()
    for path in SOURCES:
        if path.is_file():
            named |= set(re.findall(r"\bEMBEDDECK_[A-Z_]+[A-Z]\b", path.read_text(errors="replace")))
    assert named - set(VARIABLES) == set()


def test_the_readme_table_is_the_declaration():
    readme = (REPO / "README.md").read_text()
    assert markdown_table() in readme, "regenerate it: python -m jobs.core.settings"


def test_python_reads_the_environment_only_through_settings():
    offenders = [str(p.relative_to(REPO)) for p in SOURCES if p.suffix == ".py" and p.name != "settings.py"
                 and re.search(r"os\.environ\.get\([\"']EMBEDDECK_|os\.environ\[[\"']EMBEDDECK_\w+[\"']\](?!\s*=)",
                               p.read_text())]
    assert offenders == []


def test_values_defaults_and_bad_numbers():
    s = Settings({"EMBEDDECK_MASTER_PORT": "7999", "EMBEDDECK_WORKER_CORES": "two", "EMBEDDECK_PRECISION": ""})
    assert s.integer("EMBEDDECK_MASTER_PORT") == 7999
    assert s.raw("EMBEDDECK_PRECISION") == "auto"  # empty means unset
    with pytest.raises(BadRequest, match="EMBEDDECK_WORKER_CORES must be an integer of at least 1, not 'two'"):
        s.integer("EMBEDDECK_WORKER_CORES")
    with pytest.raises(KeyError):
        s.raw("EMBEDDECK_NOT_DECLARED")
    # Out of its bounds, named as such: a port of 0 let Spark pick any (`spark://127.0.0.1:0` for the workers to
    # dial), and a limit of -1 read "workers must be between 0 and -1".
    bounded = Settings({"EMBEDDECK_MASTER_PORT": "0", "EMBEDDECK_MAX_WORKERS": "-1", "EMBEDDECK_WORKER_CORES": "0"})
    with pytest.raises(BadRequest, match="EMBEDDECK_MASTER_PORT must be an integer from 1 to 65535, not '0'"):
        bounded.integer("EMBEDDECK_MASTER_PORT")
    with pytest.raises(BadRequest, match="EMBEDDECK_MAX_WORKERS must be an integer of at least 0, not '-1'"):
        bounded.integer("EMBEDDECK_MAX_WORKERS")
    with pytest.raises(BadRequest, match="EMBEDDECK_WORKER_CORES must be an integer of at least 1, not '0'"):
        bounded.integer("EMBEDDECK_WORKER_CORES")
    with pytest.raises(BadRequest, match="EMBEDDECK_DRIVER_PORT must be an integer from 1 to 65535, not '70780'"):
        Settings({"EMBEDDECK_DRIVER_PORT": "70780"}).check_values()  # spark-submit would have refused it
    for price in ("-0.01", "nan", "inf"):  # a cost of NaN or below zero is no price
        with pytest.raises(BadRequest, match=f"_PRICE_PER_UNIT_S must be a number of at least 0, not '{price}'"):
            Settings({"EMBEDDECK_PRICE_PER_UNIT_S": price}).number("EMBEDDECK_PRICE_PER_UNIT_S")
    assert Settings({"EMBEDDECK_PRICE_PER_UNIT_S": "0.000123"}).number("EMBEDDECK_PRICE_PER_UNIT_S") == 0.000123
    sizes = {"2g": "2g", "512M": "512M", "1536mb": "1536mb", " 4G ": "4G", "2048": "2048"}
    assert {v: Settings({"EMBEDDECK_WORKER_MEMORY": v}).size("EMBEDDECK_WORKER_MEMORY") for v in sizes} == sizes
    # As Spark reads a memory setting: a bare number is MiB.
    assert [size_mib(v) for v in ("2g", "512M", "1536mb", " 4G ", "2048", "1t", "2048k", "1048576b")] == \
        [2048, 512, 1536, 4096, 2048, 1024 * 1024, 2, 1]
    for bad in ("lots", "0g", "1.5g", "2 g", "-1g", "2gib"):  # what Spark's byte strings refuse, and zero
        with pytest.raises(BadRequest, match="EMBEDDECK_WORKER_MEMORY must be a memory size such as 512m or 2g, not "):
            Settings({"EMBEDDECK_WORKER_MEMORY": bad}).size("EMBEDDECK_WORKER_MEMORY")


def test_home_is_the_owners_alone(tmp_path):
    """Registry, demo database and logs were readable by every user (0644 in a 0755 folder)."""
    home = Settings({"EMBEDDECK_HOME": str(tmp_path / "fresh" / "home")}).home
    assert home.is_dir() and home.stat().st_mode & 0o777 == 0o700


def test_a_home_that_cannot_be_a_folder_is_named_by_every_door_in_one_line(tmp_path):
    """EMBEDDECK_HOME naming a file, or a folder under one, ended every door (the CLI, the cluster's, make run) in
    a FileExistsError or NotADirectoryError traceback."""
    import os
    import subprocess
    import sys

    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine\n")
    for home, why in [(a_file, "it is a file"), (a_file / "home", "Not a directory")]:
        with pytest.raises(BadRequest, match=f"EMBEDDECK_HOME '{home}' cannot be EmbedDeck's folder: {why}"):
            Settings({"EMBEDDECK_HOME": str(home)}).check_values()
    env = dict(os.environ, EMBEDDECK_HOME=str(a_file))
    for door in (["jobs", "list"], ["cluster", "status"], ["dashboard"]):
        out = subprocess.run([sys.executable, "-m", *door], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 2, out.stderr
        assert out.stderr.startswith(f"error: EMBEDDECK_HOME '{a_file}' cannot be EmbedDeck's folder: it is a file"), \
            out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert a_file.read_text() == "mine\n"
