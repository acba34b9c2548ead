"""Spark process plumbing: spark-submit, the warm run service, JVM options, the Python worker daemon."""
