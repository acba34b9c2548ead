"""JVM start-up options for Spark drivers, executors and daemons, with a class-data-sharing archive.

Measured on 2 vCPUs: a spark-submit driver reaches its first task in ~10.5 s; with C1 only and the
serial collector ~9.5 s; with Spark's classes read from an AppCDS archive ~7.4 s. The JVMs here
schedule and move small results while Python does the work, so C2's peak speed buys nothing.

`python -m jobs.spark.jvm` builds the archive (`make setup` does), by running one tiny Spark job and
dumping the classes it loaded. It belongs to this JDK and this pyspark: the key in its file name
changes with either, and a JVM that cannot map it starts without it (-Xshare:auto).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from jobs.core.processes import write_private
from jobs.core.settings import REPO, Settings, public_env

FAST_START = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"


def _java() -> Path | None:
    home = os.environ.get("JAVA_HOME")
    found = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    return Path(found).resolve() if found and Path(found).exists() else None


def archive_path() -> Path | None:
    """Where this JDK + pyspark pair keeps its archive (beside the Python environment); None without Java."""
    import pyspark

    java = _java()
    if java is None:
        return None
    jars = Path(pyspark.__file__).parent / "jars"
    key = "\n".join([str(java), str(java.stat().st_mtime_ns), pyspark.__version__,
                     *sorted(p.name for p in jars.glob("*.jar"))])
    return Path(sys.prefix) / "embeddeck-jvm" / f"spark-{hashlib.sha256(key.encode()).hexdigest()[:16]}.jsa"


def spark_submit() -> str:
    """The spark-submit script of the installed pyspark."""
    import pyspark

    return str(Path(pyspark.__file__).parent / "bin" / "spark-submit")


def spark_class() -> str:
    """The spark-class script that starts Spark's daemons (pip's pyspark has no sbin scripts)."""
    import pyspark

    return str(Path(pyspark.__file__).parent / "bin" / "spark-class")


AUTH_SECRET_ENV = "_SPARK_AUTH_SECRET"  # where Spark's SecurityManager reads the shared secret from
AUTH_OPTIONS = "-Dspark.authenticate=true -Dspark.network.crypto.enabled=true"


def auth_secret_path() -> Path:
    """One secret per EmbedDeck home: every cluster, driver and run service of this home shares it."""
    return Settings().home / "cluster" / "spark-auth.secret"


def ensure_auth_secret() -> str:
    """The local cluster's Spark secret, made once (owner-only file) when the cluster first starts."""
    path = auth_secret_path()
    if not path.is_file():
        write_private(path, secrets.token_hex(32))
    return path.read_text().strip()


def auth_secret() -> str | None:
    """The secret Spark applications and daemons authenticate with: the environment's (a secret reference on
    ACA), else the local cluster's file; None where no cluster made one."""
    if os.environ.get(AUTH_SECRET_ENV):
        return os.environ[AUTH_SECRET_ENV]
    path = auth_secret_path()
    return path.read_text().strip() if path.is_file() else None


def spark_env(db_url: str | None = None, secrets_too: bool = False) -> dict[str, str]:
    """Environment of a Spark program we start: loopback binding, our Python, our code on the path, and no
    secret but what it needs: a driver (secrets_too) keeps the registry's URL, endpoint keys and its run's
    database URL; daemons and sidecars get none. Spark's own secret is passed where Spark reads it."""
    env = dict(os.environ) if secrets_too else public_env()
    env.pop("EMBEDDECK_API_TOKEN", None)
    env.pop("EMBEDDECK_API_TOKEN_FILE", None)
    secret = auth_secret()
    if secret:
        env[AUTH_SECRET_ENV] = secret
    env.update({
        "SPARK_LOCAL_IP": "127.0.0.1",
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
    })
    if db_url:
        env["EMBEDDECK_RUN_DB_URL"] = db_url
    return env


def scratch_root(home: Path) -> Path:
    """Where the scratch of each of our JVMs of this home lives, one directory per owner."""
    return home / "tmp"


def scratch_dir(home: Path, owner: str) -> Path:
    """The scratch of one of our JVMs under home ("master", "worker-0", "runner", "run-<id>"), created owner-only.
    Spark keeps its blocks there, and so a run's broadcast secrets, which a killed JVM would leave in /tmp."""
    scratch_root(home).mkdir(mode=0o700, parents=True, exist_ok=True)
    path = scratch_root(home) / owner
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def clear_scratch(home: Path, owner: str) -> None:
    """Remove what owner's JVM left in its scratch: call it once that JVM has stopped, however it stopped."""
    shutil.rmtree(scratch_root(home) / owner, ignore_errors=True)


def java_options(scratch: Path | None = None) -> str:
    """Options for every Spark JVM we start: fast start-up, the shared archive when it exists, and the JVM's
    scratch where given (Spark's local directories default to java.io.tmpdir)."""
    path = archive_path()
    options = FAST_START
    # Spark splits these strings as a shell would: a path with a space, unquoted, was two options, and the JVM took
    # the second for its main class ("Could not find or load main class with"), so every run failed.
    if path is not None and path.is_file():
        options += f" -Xshare:auto {shlex.quote(f'-XX:SharedArchiveFile={path}')}"
    if scratch is not None:
        options += f" {shlex.quote(f'-Djava.io.tmpdir={scratch}')}"
    return options


def build_archive(timeout_s: float = 300.0) -> Path | None:
    """Dump the classes one small Spark job loads into this pair's archive; its path, or None without Java."""
    path = archive_path()
    if path is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".dump-", suffix=".jsa", dir=path.parent)
    os.close(fd)
    os.unlink(tmp)  # the JVM writes the file itself, at exit
    cmd = [spark_submit(), "--master", "local[1]", "--conf", "spark.ui.enabled=false",
           "--conf", "spark.ui.showConsoleProgress=false",
           "--driver-java-options", f"{FAST_START} {shlex.quote(f'-XX:ArchiveClassesAtExit={tmp}')}",
           str(Path(__file__).resolve()), "--sample-job"]
    out = subprocess.run(cmd, env=spark_env(), capture_output=True, text=True, timeout=timeout_s)
    if out.returncode != 0 or not Path(tmp).is_file():
        Path(tmp).unlink(missing_ok=True)
        raise RuntimeError(f"JVM archive dump failed (exit {out.returncode}): {out.stderr[-1500:]}")
    os.replace(tmp, path)  # atomic: a JVM starting now maps the old file or the whole new one
    return path


def _sample_job() -> None:
    from pyspark import SparkContext

    sc = SparkContext(appName="embeddeck-jvm-archive")
    try:
        sc.parallelize(range(8), 2).map(lambda x: x * x).collect()
    finally:
        sc.stop()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--sample-job"]:
        _sample_job()
        return 0
    path = archive_path()
    if path is None:
        print("no Java found: nothing to archive")
        return 2
    if not path.is_file():
        try:
            build_archive()
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            # An optimisation only: JVMs start without it (slower), so setup goes on.
            print(f"JVM class archive not built, Spark starts without it: {exc}", file=sys.stderr)
            return 0
    print(f"JVM class archive: {path} ({path.stat().st_size / 2**20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
