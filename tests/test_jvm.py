"""JVM start-up options: the class archive maps for real, and it is keyed to this JDK and pyspark."""

import os
import subprocess
from pathlib import Path

import pytest

from jobs.spark import jvm
from jobs.spark.jvm import spark_env, spark_submit
from jobs.spark.submit import spark_conf

pytestmark = pytest.mark.spark


def test_spark_jvms_start_from_the_archive():
    path = jvm.archive_path()
    if not path.is_file():  # `make setup` builds it; a bare pytest run builds it here
        jvm.build_archive()
    options = jvm.java_options()
    assert f"-XX:SharedArchiveFile={path}" in options
    assert spark_conf("local[1]")["spark.driver.extraJavaOptions"] == options
    # A driver's scratch is the one it is given; an executor's, its own work directory.
    assert spark_conf("local[1]", Path("/x/tmp/run-1"))["spark.driver.extraJavaOptions"] == (
        f"{options} -Djava.io.tmpdir=/x/tmp/run-1")
    assert spark_conf("local[1]")["spark.executor.extraJavaOptions"] == f"{options} -Djava.io.tmpdir=."
    # Python workers on Unix sockets where Spark's socket path fits in 107 bytes, else on loopback TCP.
    assert spark_conf("local[1]", Path("/x/tmp/run-1"))["spark.python.unix.domain.socket.enabled"] == "true"
    assert spark_conf("local[1]", Path("/x" * 32))["spark.python.unix.domain.socket.enabled"] == "true"  # 64 + 43
    assert spark_conf("local[1]", Path("/x" * 32 + "y"))["spark.python.unix.domain.socket.enabled"] == "false"
    # -Xshare:on makes the JVM refuse to start when it cannot map the archive (auto would fall back).
    strict = options.replace("-Xshare:auto", "-Xshare:on")
    out = subprocess.run([spark_submit(), "--master", "local[1]", "--conf", "spark.ui.enabled=false",
                          "--driver-java-options", strict, jvm.__file__, "--sample-job"],
                         env=spark_env(), capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]


def test_archive_is_keyed_to_the_jdk_and_absent_archives_are_not_named(tmp_path: Path, monkeypatch):
    fake_home = tmp_path / "jdk"
    (fake_home / "bin").mkdir(parents=True)
    (fake_home / "bin" / "java").write_text("#!/bin/sh\n")
    real = jvm.archive_path()
    monkeypatch.setenv("JAVA_HOME", str(fake_home))
    other = jvm.archive_path()
    assert other != real and other.parent == real.parent
    assert jvm.java_options() == jvm.FAST_START  # no archive for that JDK yet: none is named
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "missing"))
    assert jvm.archive_path() is None
    assert os.path.basename(str(real)).startswith("spark-")
