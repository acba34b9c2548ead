"""RunSpec: what one embedding run does, and its validation."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from urllib.parse import urlsplit

from jobs.core.errors import BadRequest

DEFAULT_MODEL = "all-MiniLM-L6-v2"
MODES = ("incremental", "full")
# Rows per forward pass at most. On CPU the encoder also caps a batch's padded tokens, so short texts fill
# a batch of up to this many rows and long ones split (jobs/embed/bert.py, CPU_BATCH_TOKENS).
DEFAULT_BATCH_SIZE = 128
# The in-process masters Spark accepts (SparkMasterRegex): local, local[N] or local[*], with ", F" task retries.
_LOCAL_MASTER = re.compile(r"local(\[([1-9][0-9]*|\*)(\s*,\s*[1-9][0-9]*)?\])?")
_MASTER_FORMS = "local[N] (N 1 or more, or *) or spark://host:port"


@dataclass(frozen=True)
class RunSpec:
    """One embedding run: read `source`, embed `text_column`, upsert into `target`."""

    db_url: str
    source: str
    id_column: str
    text_column: str
    target: str
    model: str = DEFAULT_MODEL
    batch_size: int = DEFAULT_BATCH_SIZE
    chunk_rows: int = 2048  # rows read per query and sorted by length together (less padding)
    partitions: int | None = None
    mode: str = "incremental"
    master: str = "local[*]"
    limit_rows: int | None = None
    endpoint: str | None = None  # a configured remote endpoint's name (the CLI also takes a URL); None: local
    launched_by: str = "cli"

    def check_shape(self) -> None:
        """Validate what can be checked without a database; raise BadRequest."""
        for name in ("db_url", "source", "id_column", "text_column", "target", "model", "master"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise BadRequest(f"{name} is empty")
        for name in ("source", "id_column", "text_column", "target"):
            _check_identifier(name, getattr(self, name))
        if self.mode not in MODES:
            raise BadRequest(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if not 1 <= self.batch_size <= 4096:
            raise BadRequest(f"batch size must be between 1 and 4096, not {self.batch_size}")
        if not 1 <= self.chunk_rows <= 100_000:
            raise BadRequest(f"chunk rows must be between 1 and 100000, not {self.chunk_rows}")
        if self.partitions is not None and not 1 <= self.partitions <= 10_000:
            raise BadRequest(f"partitions must be between 1 and 10000, not {self.partitions}")
        if self.endpoint is not None:
            if not self.endpoint.strip() or len(self.endpoint) > 2000:
                raise BadRequest("endpoint must be a configured endpoint's name or an http(s) URL")
            _check_identifier("endpoint", self.endpoint)
        if self.limit_rows is not None and self.limit_rows < 1:
            raise BadRequest(f"limit rows must be 1 or more, not {self.limit_rows}")
        if self.source == self.target:
            raise BadRequest("target table must differ from the source table")
        check_master_url(self.master)

    @property
    def model_identity(self) -> str:
        """What the target's model column records: the model, and the endpoint that ran it when remote. A
        local run never takes a remote run's vectors for its own, nor one endpoint's for another's."""
        return f"{self.model}@{self.endpoint}" if self.endpoint else self.model

    def to_json(self) -> str:
        """Serialise; callers must redact db_url first when the JSON is stored or shown."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        """Inverse of to_json; unknown keys are an error, not silently dropped."""
        data = json.loads(text)
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise BadRequest(f"unknown run spec fields: {', '.join(sorted(unknown))}")
        return cls(**data)

    def with_db_url(self, db_url: str) -> RunSpec:
        """The same spec against another connection URL (e.g. the unredacted one)."""
        return replace(self, db_url=db_url)


def check_master_url(master: str) -> None:
    """Raise BadRequest unless master is a URL Spark takes: local[0], local[x], `localhost` or a port out of range
    had started a driver that died at once ("killed or crashed"), or raised a traceback."""
    if _LOCAL_MASTER.fullmatch(master):
        return
    problem = f"master must be {_MASTER_FORMS}, not {master!r}"
    parts = urlsplit(master)
    if parts.scheme != "spark":
        raise BadRequest(problem)
    if "," in parts.netloc:  # a standby list, spark://a:7077,b:7077
        raise BadRequest(f"{problem}: one master, not a list of standbys")
    try:
        port = parts.port
    except ValueError:  # not a number, or beyond 65535
        port = 0
    if not parts.hostname or not port or parts.path or parts.query or parts.fragment or parts.username:
        # Spark's own parser refuses the same (Utils.extractHostPortFromSparkUrl): no default port, no path.
        raise BadRequest(f"{problem}: a host and a port from 1 to 65535, nothing else")


def in_process(master: str | None) -> bool:
    """Whether a run on this master runs in its driver's own process (local[N]), on none of a cluster's workers."""
    return bool(master) and master.startswith("local")


def _check_identifier(role: str, name: str) -> None:
    """Table and column names: no control characters (NUL breaks every driver), valid Unicode."""
    bad = next((c for c in name if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise BadRequest(f"{role} {name!r} contains the control character {bad!r}")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{role} {name!r} is not valid Unicode (a lone surrogate)") from None
