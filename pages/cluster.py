"""Cluster: workers over time with autoscaler decisions, scaling controls, utilisation, Spark stats."""

import pandas as pd
import streamlit as st

from cluster import backends, spark_rest
from dashboard import charts, services, shell, views, widgets
from jobs.core.errors import EmbedDeckError
from jobs.spark import run_service
from jobs.store import db, scaling, worker_readings

shell.open_page()
st.title("Cluster")
backend = services.backend()
controller = services.controller()


LIVE_EVERY_S = 3.0


@st.fragment(run_every=widgets.live_every("cluster", LIVE_EVERY_S))
def overview() -> None:
    state = backend.master_state()
    if not state.reachable:
        hint = " Start it below or with `python -m cluster up`." if backend.name == "local" else \
            " It runs in the controller app and is reached from inside the Container Apps environment."
        st.warning(f"Spark master is down ({views.literal(state.error)}).{hint}")
    m = st.columns(4)
    m[0].metric("Master", state.status if state.reachable else "down")
    m[1].metric("Alive workers", state.alive_workers)
    m[2].metric("Cores used", f"{state.cores_used}/{state.cores}")
    m[3].metric("Running apps", len(state.active_apps))
    events = controller.history.events()
    st.plotly_chart(charts.workers_figure(controller.history.samples(), events, db.utcnow()), width="stretch")
    if events:
        st.caption("Latest scaling decisions")
        st.dataframe(pd.DataFrame(views.decision_rows(events[-5:])), hide_index=True, width="stretch")

    st.subheader("Worker utilisation")
    readings = backend.utilisation()
    if not readings:
        st.caption("No worker telemetry yet: readings appear once workers run.")
    rows = views.telemetry_rows(readings)
    pricing = backend.pricing()
    if rows:
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
        st.caption("CPU % is of one core (100 = one core busy). PSS is the memory of the worker's processes with the "
                   "pages they share counted once. Stale readings are older than "
                   f"{worker_readings.STALE_AFTER_S:.0f}s and are not current values. "
                   f"Each worker bills {pricing.units_per_worker:g} {pricing.unit}(s).")

    st.subheader("Spark")
    service = run_service.info()
    if service:
        st.caption(f"Run service up: runs start warm on its executors ([its Spark UI]({service['ui_url']})).")
    elif run_service.starting(backend.master_url()):
        st.caption("Run service starting: runs launched now wait for it.")
    else:
        st.caption("Run service not running: each run starts a Spark application of its own.")
    runs = services.registry().list(50)
    apps = views.runs_by_app(runs)
    if not apps:
        st.caption("No run is active.")
    for ui_url, run_ids in apps.items():
        label = ", ".join(run_ids)
        stats = spark_rest.app_stats(ui_url)
        if not stats.reachable:
            st.caption(f"{label}: Spark UI {views.literal(stats.error)}")
            continue
        s = st.columns(5)
        s[0].metric("Executors", len(stats.executors))
        s[1].metric("Active tasks", stats.active_tasks)
        s[2].metric("Completed tasks", stats.completed_tasks)
        s[3].metric("Failed tasks", stats.failed_tasks)
        s[4].metric("GC time", f"{stats.gc_time_ms / 1000:.1f}s")
        st.dataframe(pd.DataFrame(stats.stages), hide_index=True, width="stretch")
        st.markdown(f"[Spark UI of {label}]({ui_url})")
    st.markdown(f"[Spark master UI]({backend.master_webui})")
    wanted = controller.history.last_desired()
    moving = any(r.active for r in runs) or (wanted is not None and wanted != state.alive_workers)
    st.caption(f"This view updates every {LIVE_EVERY_S:g} s while a run is active or workers are scaling, "
               f"every {widgets.IDLE_EVERY_S:g} s otherwise.")
    widgets.keep_pace("cluster", LIVE_EVERY_S, moving)


overview()

st.subheader("Scaling")
settings = scaling.load_settings(services.registry())
c1, c2, c3 = st.columns(3)
auto = c1.toggle("Autoscale", value=settings.autoscale)
limit = scaling.max_workers()  # EMBEDDECK_MAX_WORKERS; settings saved under a higher limit are shown within it
lo = c2.number_input("Min workers", 0, limit, min(settings.min_workers, limit))
hi = c3.number_input("Max workers", 1, max(limit, 1), max(min(settings.max_workers, limit), 1))
if (auto, lo, hi) != (settings.autoscale, settings.min_workers, settings.max_workers):
    settings.autoscale, settings.min_workers, settings.max_workers = auto, int(lo), int(max(lo, hi))
    scaling.save_settings(settings, services.registry())
    st.toast("Autoscale settings saved")
n = st.number_input("Workers", 0, limit, min(controller.current(), limit))
b1, b2 = st.columns(2)
master_up = backend.master_state().reachable
local = backend.name == "local"  # ACA's master lives in the controller app; only a local one is ours to start
try:
    if b1.button("Scale now (turns autoscale off)"):
        if local and not master_up:
            with st.spinner("starting the master and its run service…"):
                backends.start_all(backend)
        with st.spinner(f"scaling to {n}…"):
            controller.scale_manually(int(n))
        st.rerun()
    active = len(backends.active_runs(backend, services.registry())) if master_up else 0
    stop_label = f"Stop cluster (cancels {active} active run{'s' * (active != 1)})" if active else "Stop cluster"
    if local and b2.button(stop_label if master_up else "Start master"):
        with st.spinner("stopping the cluster…" if master_up else "starting the master and its run service…"):
            backends.stop_all(backend, services.registry()) if master_up else backends.start_all(backend)
        st.rerun()
except EmbedDeckError as exc:
    st.error(views.literal(exc))
if not local:
    b2.caption("Replicas follow the worker app's KEDA rule, which reads this count from the controller's "
               "/autoscale at every poll (30 s by default).")
