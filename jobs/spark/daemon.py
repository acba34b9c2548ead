"""PySpark worker daemon that imports the encoder's heavy modules once, before it forks workers.

Set as spark.python.daemon.module: every Python worker of an executor is forked from this process,
so torch and the plain-torch BERT encoder (jobs.embed.bert) are imported once per executor instead of
once per worker (seconds of CPU each), and their pages are shared copy-on-write.
"""

import gc
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jobs.embed.bert
import jobs.embed.pipeline  # noqa: F401
from jobs.spark.python_path import use_installed_pyspark

if __name__ == "__main__":
    use_installed_pyspark()  # before pyspark: each worker forked from here then imports none of it from a zip
    from pyspark.daemon import manager

    # PySpark's daemon runs gc.collect() in a reused worker after every task: over the ~220,000 objects that
    # torch, the encoder and SQLAlchemy import, 0.1 s of a core at each task boundary. Frozen before any fork,
    # they are never scanned (and their pages stay shared); a model load adds a few hundred more.
    gc.freeze()
    manager()
