"""`python -m cluster up|scale|status|down|autoscale`: the same operations the dashboard calls."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict

from cluster import telemetry
from cluster.controller import Controller, load_settings, save_settings
from cluster.local import ClusterError, LocalCluster
from jobs import runner


def status_dict(cluster: LocalCluster) -> dict:
    """Master state, workers, desired vs actual, telemetry: all JSON-ready."""
    state = cluster.state()
    settings = load_settings(cluster.dir.parent)
    workers = cluster.workers()
    return {
        "master": {"url": cluster.master_url(), "webui": cluster.master_webui,
                   "state": state.status if state.reachable else "down", "error": state.error,
                   "alive_workers": state.alive_workers, "cores": state.cores, "cores_used": state.cores_used,
                   "memory_mb": state.memory_mb, "active_apps": state.active_apps},
        "workers": [asdict(w) for w in workers],
        "desired": settings.desired if not settings.autoscale else None,
        "actual": sum(1 for w in workers if w.state == "ALIVE"),
        "autoscale": asdict(settings),
        "runner": runner.info(),
        "telemetry": [asdict(r) for r in telemetry.read_all(telemetry.store_dir(cluster.dir.parent))],
    }


def deploy_command(dry_run: bool) -> int:
    from cluster import deploy

    try:
        config, missing = deploy.AcaConfig.from_env(allow_missing=dry_run)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if dry_run:
        print(json.dumps({"missing": missing, "resources": deploy.dry_run(config)}, indent=2))
        return 0
    deploy.deploy(config)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster", description="EmbedDeck local Spark cluster")
    verbs = parser.add_subparsers(dest="verb", required=True)
    up = verbs.add_parser("up", help="start the master (and N workers)")
    up.add_argument("--workers", type=int, default=0)
    up.add_argument("--no-runner", action="store_true",
                    help="do not start the warm run service (each run is then its own Spark application)")
    scale = verbs.add_parser("scale", help="scale to N workers (switches autoscale off)")
    scale.add_argument("n", type=int)
    st = verbs.add_parser("status", help="master, workers, telemetry")
    st.add_argument("--json", action="store_true")
    verbs.add_parser("down", help="stop every worker and the master")
    auto = verbs.add_parser("autoscale", help="run the autoscaling controller loop")
    auto.add_argument("--min", type=int, default=None)
    auto.add_argument("--max", type=int, default=None)
    auto.add_argument("--every", type=float, default=5.0)
    dep = verbs.add_parser("deploy", help="deploy to Azure Container Apps (configuration from the environment)")
    dep.add_argument("--dry-run", action="store_true", help="print every resource body, secrets masked")
    args = parser.parse_args(argv)
    if args.verb == "deploy":
        return deploy_command(args.dry_run)
    cluster = LocalCluster()
    try:
        if args.verb == "up":
            state = cluster.up(args.workers)
            print(f"master {cluster.master_url()} (UI {cluster.master_webui}), {state.alive_workers} workers")
            if not args.no_runner:
                print(f"run service up (UI {runner.start(cluster.master_url())['ui_url']})")
        elif args.verb == "scale":
            Controller(cluster).scale_manually(args.n)
            print(f"{len(cluster.worker_pids())} workers")
        elif args.verb == "status":
            info = status_dict(cluster)
            if args.json:
                print(json.dumps(info, indent=2, default=str))
            else:
                m = info["master"]
                print(f"master {m['url']}: {m['state']}, {m['alive_workers']} workers, "
                      f"{m['cores_used']}/{m['cores']} cores used")
                for w in info["workers"]:
                    print(f"  {w['name']}: {w['state']} {w['detail']}")
        elif args.verb == "down":
            runner.stop()
            cluster.down()
            print("cluster stopped")
        elif args.verb == "autoscale":
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
            settings = load_settings(cluster.dir.parent)
            settings.autoscale = True
            settings.min_workers = settings.min_workers if args.min is None else args.min
            settings.max_workers = settings.max_workers if args.max is None else args.max
            save_settings(settings, cluster.dir.parent)
            if not cluster.master_alive():
                cluster.up(settings.min_workers)
            Controller(cluster).loop(args.every)
    except (ClusterError, RuntimeError) as exc:  # RuntimeError: the run service did not start
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
