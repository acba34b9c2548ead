"""`python -m cluster up|scale|status|down|autoscale|deploy`: the same operations the dashboard calls, on the
backend that EMBEDDECK_CLUSTER_BACKEND names (local processes by default)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict

from cluster import backends
from cluster.backend import Backend
from cluster.controller import Controller
from jobs.core.errors import EmbedDeckError
from jobs.spark import run_service
from jobs.store import scaling
from jobs.store.registry import Registry


def status_dict(backend: Backend, registry: Registry) -> dict:
    """Master state, workers, desired vs actual, readings: all JSON-ready."""
    state = backend.master_state()
    settings = scaling.load_settings(registry)
    workers = backend.workers()
    return {
        "backend": backend.name,
        "master": {"url": backend.master_url(), "webui": backend.master_webui,
                   "state": state.status if state.reachable else "down", "error": state.error,
                   "alive_workers": state.alive_workers, "cores": state.cores, "cores_used": state.cores_used,
                   "memory_mb": state.memory_mb, "active_apps": state.active_apps},
        "workers": [asdict(w) for w in workers],
        "desired": settings.desired if not settings.autoscale else None,
        "actual": sum(1 for w in workers if w.running),
        "autoscale": asdict(settings),
        "runner": run_service.info(),
        "telemetry": [asdict(r) for r in backend.utilisation()],
    }


def deploy_command(dry_run: bool) -> int:
    from cluster import deploy  # the Azure SDK's models take a second to import; only deploy needs them

    config, missing = deploy.AcaConfig.from_env(allow_missing=dry_run)
    if dry_run:
        print(json.dumps({"missing": missing, "resources": deploy.dry_run(config)}, indent=2))
        return 0
    deploy.deploy(config)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cluster", description="EmbedDeck's Spark cluster")
    verbs = parser.add_subparsers(dest="verb", required=True)
    up = verbs.add_parser("up", help="start the master (and scale to N workers)")
    up.add_argument("--workers", type=int, default=None,
                    help="scale to N workers; without it, a running master keeps its workers")
    up.add_argument("--no-runner", action="store_true",
                    help="do not start the warm run service (each run is then its own Spark application)")
    scale = verbs.add_parser("scale", help="scale to N workers (switches autoscale off)")
    scale.add_argument("n", type=int)
    st = verbs.add_parser("status", help="master, workers, telemetry")
    st.add_argument("--json", action="store_true")
    verbs.add_parser("down", help="stop the run service, every worker and the master")
    auto = verbs.add_parser("autoscale", help="run the autoscaling controller loop")
    auto.add_argument("--min", type=int, default=None)
    auto.add_argument("--max", type=int, default=None)
    auto.add_argument("--every", type=float, default=5.0)
    dep = verbs.add_parser("deploy", help="deploy to Azure Container Apps (configuration from the environment)")
    dep.add_argument("--dry-run", action="store_true", help="print every resource body, secrets masked")
    return parser


def run_verb(args: argparse.Namespace) -> int:
    if args.verb == "deploy":
        return deploy_command(args.dry_run)
    backend, registry = backends.configured(), Registry()
    if args.verb == "up":
        if args.no_runner:
            state, service = backend.up(args.workers), None
        else:
            state, service = backends.start_all(backend, args.workers)
        print(f"master {backend.master_url()} (UI {backend.master_webui}), {state.alive_workers} workers")
        if service:
            print(f"run service up (UI {service['ui_url']})")
    elif args.verb == "scale":
        Controller(backend, registry).scale_manually(args.n)
        print(f"{sum(1 for w in backend.workers() if w.running)} workers")
    elif args.verb == "status":
        info = status_dict(backend, registry)
        if args.json:
            print(json.dumps(info, indent=2, default=str))
        else:
            m = info["master"]
            print(f"master {m['url']}: {m['state']}, {m['alive_workers']} workers, "
                  f"{m['cores_used']}/{m['cores']} cores used")
            for w in info["workers"]:
                print(f"  {w['name']}: {w['state']} {w['detail']}")
            service = info["runner"]
            if service:
                print(f"run service: up, pid {service['pid']} (UI {service['ui_url']})")
            elif run_service.starting(backend.master_url()):
                print("run service: starting (runs launched now wait for it)")
            else:
                print("run service: not running (each run starts a Spark application of its own)")
    elif args.verb == "down":
        cancelled = backends.stop_all(backend, registry)
        print(f"cancelled {len(cancelled)} run(s) of this cluster: {', '.join(cancelled)}\n" if cancelled else "",
              end="")
        print("cluster stopped")
    elif args.verb == "autoscale":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        settings = scaling.load_settings(registry)
        settings.autoscale = True
        settings.min_workers = settings.min_workers if args.min is None else args.min
        settings.max_workers = settings.max_workers if args.max is None else args.max
        scaling.save_settings(settings, registry)
        if not backend.master_state().reachable:
            backends.start_all(backend, settings.min_workers)
        Controller(backend, registry).loop(args.every)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_verb(args)
    except EmbedDeckError as exc:  # bad input, an unreachable master, a run service that did not start
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, SIGTERM, SIGHUP (exit_with gives the status)
        if args.verb in ("up", "scale"):
            started = "the master and workers" if args.verb == "up" else "the workers"
            print(f"{args.verb} interrupted: {started} it had started run on (`python -m cluster status` shows them, "
                  "`python -m cluster down` stops them)", file=sys.stderr)
        raise
