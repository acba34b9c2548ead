"""Settings: every EMBEDDECK_* environment variable EmbedDeck reads, with its default and meaning, in one
table. Values are read when asked for, so a test's or a child process's environment counts; the
README's variables table is generated from VARIABLES (tests/test_settings.py keeps them equal)."""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from jobs.core.errors import BadRequest
from jobs.core.spec import check_master_url

REPO = Path(__file__).resolve().parent.parent.parent
# Spark's byte strings (JavaUtils.byteStringAs): whole numbers, then a unit; a bare number is MiB where Spark reads
# a memory setting.
SPARK_SIZE = re.compile(r"(\d+)([kmgtp]b?|b)?", re.IGNORECASE)


def size_mib(size: str) -> float:
    """A Spark memory size (as Settings.size returns it) in MiB, as Spark reads a memory setting."""
    match = SPARK_SIZE.fullmatch(size.strip())
    if not match:
        raise BadRequest(f"not a memory size: {size!r}")
    return int(match[1]) * 1024.0 ** ("bkmgtp".index((match[2] or "m")[0].lower()) - 2)
HOLD_FILE_VAR = "EMBEDDECK_FAULT_HOLD_FILE"


@dataclass(frozen=True)
class Var:
    """One environment variable: its name, default (None: unset) and what it does."""

    name: str
    default: str | None
    doc: str
    secret: bool = False  # holds (or points at) a secret: never passed to Spark daemons or executors
    least: int | None = None  # a number's bounds, where it has them (Settings refuses others by name)
    most: int | None = None
    fractional: bool = False  # a bounded number read with Settings.number, not Settings.integer
    size: bool = False  # a Spark memory size ("1g", "512m"), read with Settings.size
    path: bool = False  # a file or folder: a relative one is read from the folder the process starts in


PORT = {"least": 1, "most": 65535}
VARIABLES: dict[str, Var] = {v.name: v for v in (
    Var("EMBEDDECK_HOME", "var/", "local state: SQLite files, run logs, cluster state and daemon logs "
        "(`cluster/logs`), the local workers' executor directories and logs (`cluster/work`; a stopped "
        "application's are removed after 7 days), the Spark JVMs' scratch (`tmp`, removed as they stop), "
        "worker readings", path=True),
    Var("EMBEDDECK_DB_URL", None, "default database (a SQLAlchemy URL) for the CLI, the API and a dashboard "
                                  "connection; unset: the embedded SQLite demo `$EMBEDDECK_HOME/embeddeck.sqlite`",
        secret=True),
    Var("EMBEDDECK_REGISTRY_URL", None, "the run registry; unset: `sqlite:///$EMBEDDECK_HOME/registry.sqlite`",
        secret=True),
    Var("EMBEDDECK_SPARK_MASTER", None, "master of runs that name none (API, dashboard, CLI without `--master`); "
                                        "unset: the run service's master when one is up, else `local[*]`"),
    Var("EMBEDDECK_MAX_ACTIVE_RUNS", "2", "runs started at once; more wait as `queued` (phase `waiting`) and "
                                         "start, oldest first, as others end", least=1),
    Var("EMBEDDECK_PRECISION", "auto", "`fp32`, `bf16`, `fp16`; auto picks fp16 on CUDA, bf16 on CPUs with "
                                       "AMX/AVX-512-BF16, else fp32, and logs why"),
    Var("EMBEDDECK_TORCH_THREADS", "1", "torch threads in each Spark Python worker (one per task); 0: torch's own "
                                        "choice", least=0),
    Var("EMBEDDECK_DB_OUTAGE_S", "60", "how long a run's tasks wait for a database that stopped answering (a "
        "failover, a restart) before the run fails; each then does its key range again, the rows it committed "
        "already skipped", least=0, fractional=True),
    Var("EMBEDDECK_EXECUTOR_MEMORY", "1g", "`spark.executor.memory` of every run", size=True),
    Var("EMBEDDECK_MASTER_PORT", "7077", "local master's RPC port (a port another program holds is refused by "
        "name at `up`: Spark would take the next one and say so only in its log)", **PORT),
    Var("EMBEDDECK_MASTER_WEBUI_PORT", "8080", "local master's web UI port (workers use the ports after it for "
        "theirs; their RPC ports, and runs' Spark UIs, take a port free at random from 20000 up to the kernel's "
        "ephemeral range, where no connection's or `bind(0)`'s port can take it before the JVM binds it); drivers "
        "read their master's JSON at this port of its host, to tell a master that restarted", **PORT),
    Var("EMBEDDECK_WORKER_CORES", "1", "cores of each local worker", least=1),
    Var("EMBEDDECK_WORKER_MEMORY", "2g", "memory of each local worker", size=True),
    Var("EMBEDDECK_API_PORT", "8888", "port of the controller image's trigger API (`APP_MODE=trigger`)", **PORT),
    Var("EMBEDDECK_PRICE_PER_UNIT_S", None, "price of one billing unit-second for run costs: a GPU-second on ACA "
        "(`deploy` sets the region's published rate), a core-second locally; unset: costs show units only", least=0,
        fractional=True),
    Var("EMBEDDECK_PRICE_CURRENCY", "USD", "currency of `EMBEDDECK_PRICE_PER_UNIT_S`"),
    Var("EMBEDDECK_PRICE_SOURCE", None, "where that price came from, shown beside every cost"),
    Var("EMBEDDECK_DASHBOARD_PORT", "8501", "dashboard port of `make run` and of the image's `dashboard` mode",
        **PORT),
    Var("EMBEDDECK_DASHBOARD_AUTH", "none", "who may use the dashboard: `none` (loopback only; the container "
                                            "refuses other addresses), `proxy` (an authenticating proxy's user "
                                            "header, e.g. ACA's built-in authentication), `oidc` (st.login)"),
    Var("EMBEDDECK_DASHBOARD_AUTH_HEADER", "X-MS-CLIENT-PRINCIPAL-NAME", "the user header `proxy` mode trusts"),
    Var("EMBEDDECK_CLUSTER_BACKEND", "local", "which workers the dashboard and `python -m cluster` drive: "
                                              "`local` processes or `aca` (Azure Container Apps replicas)"),
    Var("EMBEDDECK_TELEMETRY_DIR", None, "where workers publish their readings; unset: "
                                         "`$EMBEDDECK_HOME/telemetry`", path=True),
    Var("EMBEDDECK_API_TOKEN", None, "the API's bearer token (required to serve)", secret=True),
    Var("EMBEDDECK_API_TOKEN_FILE", None, "a file holding the API's token, read when `EMBEDDECK_API_TOKEN` is unset",
        secret=True, path=True),
    Var("EMBEDDECK_REMOTE_ENDPOINT", None, "an OpenAI-compatible embeddings URL configured as the endpoint "
                                           "named `remote` (more: `[endpoints.NAME]` in the secrets file)"),
    Var("EMBEDDECK_REMOTE_API_KEY", None, "the key of the endpoint `remote`, sent to that endpoint only", secret=True),
    Var("EMBEDDECK_SECRETS_FILE", None, "TOML file of named connections and endpoints with their secrets; unset: "
                                        "`.streamlit/secrets.toml` in the checkout", secret=True, path=True),
    Var("EMBEDDECK_ALLOWED_MODELS", "all-MiniLM-L6-v2", "comma-separated models (names or local directories) "
                                                        "the HTTP API runs; any other is a 400"),
    Var("EMBEDDECK_SEARCH_CACHE_MB", "1024", "largest in-memory search index; bigger targets are searched by "
                                             "streaming", least=0, fractional=True),
    Var("EMBEDDECK_SEARCH_EXACT_ROWS", "100000", "targets up to this many vectors are searched exactly; larger ones "
        "through an approximate index (faiss IVF, 8-bit)", least=0),
    Var("EMBEDDECK_DEFAULT_SOURCE", "products", "source table of the classic trigger `GET /`"),
    Var("EMBEDDECK_DEFAULT_ID_COLUMN", "id", "id column of the classic trigger"),
    Var("EMBEDDECK_DEFAULT_TEXT_COLUMN", "description", "text column of the classic trigger"),
    Var("EMBEDDECK_DEFAULT_TARGET", "product_embeddings", "target table of the classic trigger"),
    Var("EMBEDDECK_DRIVER_HOST", "127.0.0.1", "where executors reach a run's driver (the controller app's name on "
                                              "ACA)"),
    Var("EMBEDDECK_DRIVER_BIND", "127.0.0.1", "address the driver binds"),
    Var("EMBEDDECK_DRIVER_PORT", None, "fixed driver port (ACA exposes it); unset: random", **PORT),
    Var("EMBEDDECK_BLOCK_MANAGER_PORT", None, "fixed block manager port (ACA exposes it); unset: random",
        **PORT),
    Var("EMBEDDECK_RUN_DB_URL", None, "internal: the real database URL of one run, handed to its own driver "
                                      "process only", secret=True),
    Var("EMBEDDECK_FAULT_HOLD_FILE", None, "fault injection for tests and drills: while this file exists, every "
                                           "embedding task pauses after its first commit (a cancel or a killed "
                                           "worker then lands mid-run however fast the machine is)", path=True),
    Var("EMBEDDECK_NOTEBOOK_ROWS", "200", "rows the example notebook embeds"),
    Var("EMBEDDECK_NOTEBOOK_DIR", None, "where Jupyter (`make jupyter`, the container's `jupyter` mode) serves "
                                        "notebooks from (the example is copied there first when missing); unset: "
                                        "`$EMBEDDECK_HOME/notebooks`", path=True),
    Var("EMBEDDECK_JUPYTER_PORT", "8890", "port of `make jupyter`'s JupyterLab (on 127.0.0.1)", **PORT),
    Var("EMBEDDECK_ACA_MODE", "trigger", "ACA deploy: the controller's front door, `trigger` (HTTP API) or "
                                         "`jupyter`"),
    Var("EMBEDDECK_JUPYTER_TOKEN", None, "ACA deploy in jupyter mode: Jupyter's token (a Container Apps "
                                         "secret; at least 24 characters)", secret=True),
    Var("EMBEDDECK_ACA_ENV", "embeddeck-env", "ACA: the managed environment's name"),
    Var("EMBEDDECK_ACA_CONTROLLER", "embeddeck-controller", "ACA: the controller app's name"),
    Var("EMBEDDECK_ACA_WORKER", "embeddeck-worker", "ACA: the GPU worker app's name"),
    Var("EMBEDDECK_ACA_SUBNET_ID", None, "ACA deploy: the subnet of the environment"),
    Var("EMBEDDECK_STORAGE_ACCOUNT", None, "ACA deploy: the Azure Files account"),
    Var("EMBEDDECK_STORAGE_KEY", None, "ACA deploy: the Azure Files account's key", secret=True),
    Var("EMBEDDECK_SHARE", "embeddeck", "ACA deploy: the Azure Files share"),
    Var("EMBEDDECK_CONTROLLER_IMAGE", None, "ACA deploy: the controller image"),
    Var("EMBEDDECK_WORKER_IMAGE", None, "ACA deploy: the worker image"),
    Var("EMBEDDECK_GPU_PROFILE", "Consumption-GPU-NC8as-T4", "ACA deploy: the serverless GPU workload profile"),
    Var("EMBEDDECK_MAX_WORKERS", "4", "most workers: ACA replicas at deploy, and any count a door asks for (the "
                                      "API's `workers`, `python -m cluster scale` and `autoscale --max`, the "
                                      "Cluster page): more is refused by name", least=0),
    Var("EMBEDDECK_SPARK_SECRET", None, "ACA deploy: the cluster's Spark authentication secret; unset: a new "
                                        "one per deployment", secret=True),
    Var("EMBEDDECK_LOG_WORKSPACE_ID", None, "ACA: the Log Analytics workspace that holds scaling events (deploy "
                                            "sends the environment's logs there)"),
    Var("EMBEDDECK_LOG_WORKSPACE_KEY", None, "ACA deploy: that workspace's shared key", secret=True),
    Var("EMBEDDECK_ACA_DEFAULT_DOMAIN", None, "ACA deploy, dry run: the environment's default domain (a real "
                                              "deploy reads it from the environment it created)"),
    Var("EMBEDDECK_ACR_SERVER", None, "ACA deploy: the private registry the images come from"),
    Var("EMBEDDECK_ACA_IDENTITY_ID", None, "ACA deploy: a user-assigned managed identity with AcrPull on it"),
    Var("EMBEDDECK_AUTOSCALE_TOKEN", None, "a read-only token that admits `GET /autoscale` alone (KEDA's); "
                                           "deploy makes one when unset", secret=True),
    Var("EMBEDDECK_ACA_DASHBOARD", "embeddeck-dashboard", "ACA: the dashboard app's name"),
    Var("EMBEDDECK_ENTRA_CLIENT_ID", None, "ACA deploy: the Entra ID app registration the dashboard signs in "
                                           "with; without it the dashboard is not deployed"),
    Var("EMBEDDECK_ENTRA_CLIENT_SECRET", None, "ACA deploy: that registration's client secret", secret=True),
    Var("AZURE_TENANT_ID", None, "ACA deploy: the Entra ID tenant of the dashboard's sign-in"),
    Var("AZURE_SUBSCRIPTION_ID", None, "ACA: the subscription (backend and deploy)"),
    Var("AZURE_RESOURCE_GROUP", None, "ACA: the resource group (backend and deploy)"),
    Var("AZURE_LOCATION", None, "ACA: the region (backend and deploy)"),
)}
# A relative path named another place in every child that starts in another folder (a run's driver, Spark's daemons):
# with EMBEDDECK_HOME=state the driver found neither its run nor its registry and died. Made absolute once, as
# settings load, for this process and every process it starts.
for _var in VARIABLES.values():
    if _var.path and os.environ.get(_var.name) and not os.path.isabs(os.environ[_var.name]):
        os.environ[_var.name] = os.path.abspath(os.environ[_var.name])


class Settings:
    """Typed access to the environment through VARIABLES; an undeclared name is a bug, not a default."""

    def __init__(self, env: Mapping[str, str] | None = None):
        self.env = os.environ if env is None else env

    def raw(self, name: str) -> str | None:
        """The variable's value, its default when unset or empty."""
        var = VARIABLES[name]
        value = self.env.get(name)
        return value if value not in (None, "") else var.default

    def integer(self, name: str) -> int:
        """The variable as an integer; BadRequest naming it when it is not one, or not within its bounds."""
        return int(self._bounded(name, int, "an integer"))

    def number(self, name: str) -> float:
        """The variable as a finite number; BadRequest naming it when it is not one, or not within its bounds."""
        return float(self._bounded(name, float, "a number"))

    def size(self, name: str) -> str:
        """The variable as a Spark memory size (digits, then b, k, m, g, t or p, with an optional b); BadRequest
        naming it otherwise: Spark's own refusal ended a run's driver before it could report anything."""
        value = (self.raw(name) or "").strip()
        if not (match := SPARK_SIZE.fullmatch(value)) or not int(match[1]):
            raise BadRequest(f"{name} must be a memory size such as 512m or 2g, not {value!r}")
        return value

    def check_values(self) -> None:
        """BadRequest naming every bounded number, memory size or master whose value cannot be read: a door checks
        them as it starts, and a run before it is recorded, rather than fail on the first page, request or driver
        that reads one."""
        found = []
        try:
            _ = self.home
        except BadRequest as exc:
            found.append(str(exc))
        master = self.raw("EMBEDDECK_SPARK_MASTER")
        if master:
            try:
                check_master_url(master)
            except BadRequest as exc:
                found.append(f"EMBEDDECK_SPARK_MASTER: {exc}")
        for var in VARIABLES.values():
            if (var.least is not None or var.size) and self.raw(var.name) is not None:
                try:
                    self.size(var.name) if var.size else (self.number if var.fractional else self.integer)(var.name)
                except BadRequest as exc:
                    found.append(str(exc))
        if found:
            raise BadRequest("; ".join(found))

    def _bounded(self, name: str, kind: type, what: str) -> float:
        value, var = self.raw(name), VARIABLES[name]
        try:
            number = kind(value)
        except (TypeError, ValueError):
            number = None
        low, high = var.least, var.most
        if (number is None or not math.isfinite(number) or (low is not None and number < low)
                or (high is not None and number > high)):
            within = "" if low is None else f" of at least {low}" if high is None else f" from {low} to {high}"
            raise BadRequest(f"{name} must be {what}{within}, not {value!r}")
        return number

    @property
    def home(self) -> Path:
        """Where EmbedDeck keeps local state; created on first use. BadRequest naming it where it cannot be (a file,
        a folder that cannot be made): every door met that as a traceback."""
        value = self.env.get("EMBEDDECK_HOME")
        home = Path(value) if value else REPO / "var"
        try:
            if not home.is_dir():
                home.mkdir(mode=0o700, parents=True)  # registry, demo database, logs and secrets: the owner's alone
            elif not value and home.stat().st_mode & 0o077:
                home.chmod(0o700)  # the default var/ of an older checkout; a directory named by the operator is theirs
        except OSError as exc:
            why = "it is a file" if home.exists() and not home.is_dir() else exc.strerror
            raise BadRequest(f"EMBEDDECK_HOME {str(home)!r} cannot be EmbedDeck's folder: {why}") from None
        return home

    @property
    def db_url(self) -> str:
        return self.raw("EMBEDDECK_DB_URL") or f"sqlite:///{self.home / 'embeddeck.sqlite'}"

    @property
    def registry_url(self) -> str:
        return self.raw("EMBEDDECK_REGISTRY_URL") or f"sqlite:///{self.home / 'registry.sqlite'}"

    def secrets(self) -> dict:
        """The secrets file's tables ([connections.NAME], [endpoints.NAME]); empty when there is none."""
        path = Path(self.raw("EMBEDDECK_SECRETS_FILE") or REPO / ".streamlit" / "secrets.toml")
        try:
            return tomllib.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise BadRequest(f"secrets file {path} cannot be read: {exc}") from None

    @property
    def telemetry_dir(self) -> Path:
        return Path(self.raw("EMBEDDECK_TELEMETRY_DIR") or self.home / "telemetry")


# Secrets of other software that our children never need either.
OTHER_SECRETS = ("AZURE_CLIENT_SECRET", "AZURE_CLIENT_CERTIFICATE_PASSWORD", "JUPYTER_TOKEN", "_SPARK_AUTH_SECRET")


def public_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment without any secret: what Spark daemons, executors and sidecars start with."""
    env = os.environ if env is None else env
    secret = {v.name for v in VARIABLES.values() if v.secret} | set(OTHER_SECRETS)
    return {k: v for k, v in env.items() if k not in secret}


def markdown_table() -> str:
    """The README's table of variables."""
    lines = ["| variable | default | |", "|---|---|---|"]
    for var in VARIABLES.values():
        default = f"`{var.default}`" if var.default else "unset"
        kind = "a number" if var.fractional else "an integer"
        bounds = (" (a memory size such as 512m or 2g)" if var.size else "" if var.least is None
                  else f" ({kind} of at least {var.least})" if var.most is None
                  else f" ({kind} from {var.least} to {var.most})")
        where = " (a path; a relative one is read from the folder the process starts in)" if var.path else ""
        lines.append(f"| `{var.name}` | {default} | {var.doc}{bounds}{where}{' (a secret)' if var.secret else ''} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
