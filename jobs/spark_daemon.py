"""PySpark worker daemon that imports the encoder's heavy modules once, before it forks workers.

Set as spark.python.daemon.module: every Python worker of an executor is forked from this process,
so torch, transformers and sentence-transformers are imported once per executor instead of once
per worker (seconds of CPU each), and their pages are shared copy-on-write.
"""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sentence_transformers  # noqa: F401
from pyspark.daemon import manager

import jobs.pipeline  # noqa: F401

if __name__ == "__main__":
    manager()
