"""Worker telemetry publisher: a sidecar that samples one worker's GPUs (NVML) and its process tree's CPU and
memory, and writes the readings to the shared store (jobs/store/worker_readings.py) every few seconds."""

from __future__ import annotations

import argparse
import socket
import time
from pathlib import Path

import psutil

from jobs.core.processes import is_alive, process_identity
from jobs.store.worker_readings import GpuReading, Reading, publish, store_dir

PUBLISH_EVERY_S = 3.0


def read_gpus() -> tuple[list[GpuReading], str]:
    """Readings of every NVIDIA GPU through NVML, or none and the reason there are none."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:
        return [], f"no NVIDIA GPU: {type(exc).__name__}: {exc}"
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            util = pynvml.nvmlDeviceGetUtilizationRates(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            try:
                temp = float(pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU))
            except pynvml.NVMLError:
                temp = None
            try:
                power = pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0
            except pynvml.NVMLError:
                power = None
            name = pynvml.nvmlDeviceGetName(h)
            out.append(GpuReading(i, name.decode() if isinstance(name, bytes) else name, float(util.gpu),
                                  mem.used / 2**20, mem.total / 2**20, temp, power))
        return out, "" if out else "NVML found no GPU"
    finally:
        pynvml.nvmlShutdown()


def process_tree_usage(pid: int, interval: float = 0.5) -> tuple[float, float, int]:
    """CPU % (100 = one core) and memory in MB (proportional set size: shared pages counted once) of a process
    and all its descendants."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0, 0.0, 0
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(interval)
    cpu = memory = 0.0
    alive = 0
    for p in procs:
        try:
            cpu += p.cpu_percent(None)
            memory += p.memory_full_info().pss / 2**20  # smaps_rollup: about 1 ms a process
            alive += 1
        except psutil.Error:
            pass
    return cpu, memory, alive


def sample(worker: str, pid: int) -> Reading:
    """One reading of this worker: GPUs if any, and its process tree's CPU and memory."""
    gpus, note = read_gpus()
    cpu, memory, n = process_tree_usage(pid)
    return Reading(worker, socket.gethostname(), time.time(), gpus, note, cpu, memory, n)


def run_publisher(worker: str, pid: int, directory: Path, every_s: float = PUBLISH_EVERY_S) -> None:
    """Publish until the watched worker process exits: once it is a zombie its starter has yet to reap, or its pid
    another process's, it is gone (a pid that merely existed went on being published, as a worker of no process)."""
    identity = process_identity(pid)
    while is_alive(pid, identity):
        publish(sample(worker, pid), directory)
        time.sleep(max(0.0, every_s - 0.5))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="publish one worker's telemetry")
    parser.add_argument("--worker", required=True)
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args(argv)
    run_publisher(args.worker, args.pid, Path(args.dir) if args.dir else store_dir())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
