"""Worker readings: each worker's latest GPU, CPU and memory reading, one JSON file per worker in a
shared folder (local state, or the Azure Files share every replica mounts). Azure Monitor publishes no
GPU metric for Container Apps, so workers report for themselves (cluster/telemetry.py writes these)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from jobs.core.processes import read_json, write_json
from jobs.core.settings import Settings

STALE_AFTER_S = 15.0


@dataclass
class GpuReading:
    index: int
    name: str
    utilisation_pct: float
    memory_used_mb: float
    memory_total_mb: float
    temperature_c: float | None
    power_w: float | None


@dataclass
class Reading:
    """One worker's readings at one moment."""

    worker: str
    host: str
    at: float
    gpus: list[GpuReading] = field(default_factory=list)
    gpu_note: str = ""
    cpu_pct: float = 0.0
    # The worker's own: the proportional set size of its process tree (forked Python workers share their daemon's
    # pages, which a sum of RSS counted once a process: 1,228 MB against 986 here). Azure Monitor's: the replica's
    # working set.
    memory_mb: float = 0.0
    processes: int = 0
    stale: bool = False
    source: str = "worker"  # who measured CPU and memory: the worker itself, or Azure Monitor


def _known(cls, data: dict) -> dict:
    """Only the fields this version knows: a newer worker's extra fields never break a reader."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def store_dir(home: Path | None = None) -> Path:
    """The readings folder: $EMBEDDECK_TELEMETRY_DIR, else telemetry/ in EmbedDeck's home."""
    settings = Settings()
    path = Path(settings.raw("EMBEDDECK_TELEMETRY_DIR") or (home or settings.home) / "telemetry")
    path.mkdir(parents=True, exist_ok=True)
    return path


def publish(reading: Reading, directory: Path) -> None:
    """Replace this worker's reading at once, so a reader never sees half a file."""
    write_json(directory / f"{reading.worker}.json", asdict(reading))


def read_all(directory: Path, now: float | None = None, stale_after_s: float = STALE_AFTER_S) -> list[Reading]:
    """Every worker's latest reading; old ones are marked stale, never shown as zero."""
    now = time.time() if now is None else now
    out = []
    for path in sorted(directory.glob("*.json")):
        data = read_json(path)
        if not isinstance(data, dict):
            continue
        try:
            data["gpus"] = [GpuReading(**_known(GpuReading, g)) for g in data.get("gpus", [])]
            reading = Reading(**_known(Reading, data))
        except TypeError:  # a field this version needs is missing: skip it, as an unreadable file
            continue
        reading.stale = now - reading.at > stale_after_s
        out.append(reading)
    return out


def fresh_count(directory: Path | None = None) -> int:
    """How many workers published a reading recently: the worker count any process can see."""
    return sum(1 for r in read_all(directory or store_dir()) if not r.stale)
