"""Where the Python side of our Spark processes (drivers, the run service, the worker daemon) imports pyspark from.

Spark puts its own pyspark.zip and py4j zip first on every such process's PYTHONPATH. Python cannot cache
compiled code for zipped modules, so each process compiled pyspark from source as it started, and each Python
worker re-read both zips' directories, once per package imported from them, when PySpark called
importlib.invalidate_caches() at its start. Where the same pyspark and py4j are installed (pip installs both, zips
included), the installed ones import instead.
"""

from __future__ import annotations

import importlib.machinery
import logging
import sys
import zipfile
from pathlib import Path

log = logging.getLogger("embeddeck.spark")


def _zipped_package(entry: str) -> str | None:
    name = Path(entry).name
    if name == "pyspark.zip":
        return "pyspark"
    if name.startswith("py4j-") and name.endswith(".zip"):
        return "py4j"
    return None


def use_installed_pyspark() -> list[str]:
    """Drop Spark's pyspark and py4j zips from sys.path where the installed package has the same version.py, and
    return the entries dropped; call it before pyspark is first imported."""
    dropped = []
    elsewhere = [p for p in sys.path if _zipped_package(p) is None]
    for entry in list(sys.path):
        package = _zipped_package(entry)
        if package is None:
            continue
        spec = importlib.machinery.PathFinder.find_spec(package, elsewhere)
        if spec is None or spec.origin is None:
            continue
        installed = Path(spec.origin).parent
        try:
            with zipfile.ZipFile(entry) as archive:
                zipped = archive.read(f"{package}/version.py")
            same = zipped == (installed / "version.py").read_bytes()
        except (OSError, KeyError, zipfile.BadZipFile):
            same = False
        if same:
            sys.path.remove(entry)
            # importlib.invalidate_caches() re-reads the directory of every zip it still holds a finder for.
            for key in [k for k in sys.path_importer_cache if k == entry or k.startswith(entry + "/")]:
                del sys.path_importer_cache[key]
            dropped.append(entry)
            log.info("%s imports from %s, not %s", package, installed, entry)
        else:
            log.info("%s imports from %s: the installed one differs", package, entry)
    return dropped
