"""Runs: history, live progress with throughput and ETA, cancel, errors, rerun."""

import pandas as pd
import streamlit as st

from dashboard import charts, services, shell, views, widgets
from jobs import lifecycle
from jobs.core.errors import EmbedDeckError
from jobs.core.progress import format_duration
from jobs.core.settings import Settings
from jobs.core.spec import in_process
from jobs.store import scaling

shell.open_page()
st.title("Runs")
registry = services.registry()
lifecycle.refresh(registry)
ids = [r.run_id for r in registry.list()]
if not ids:
    st.info("No runs yet. Start one on the Launch page.")
    st.stop()
chosen = st.session_state.get("selected_run")
run_id = st.selectbox("Run", ids, index=ids.index(chosen) if chosen in ids else 0)
st.session_state["selected_run"] = run_id


def rerun(run) -> None:
    try:
        new_id = lifecycle.rerun(run.run_id, services.configured_connections(), "dashboard", registry)
    except EmbedDeckError as exc:
        st.error(views.literal(exc))
        return
    st.session_state["selected_run"] = new_id
    st.rerun(scope="app")


LIVE_EVERY_S = 2.0


@st.fragment(run_every=widgets.live_every("runs", LIVE_EVERY_S))
def live(run_id: str) -> None:
    run = lifecycle.get(run_id, registry)
    frac, caption = views.run_progress(run)
    st.subheader(f"{run.run_id} · {run.state}")
    st.progress(frac, text=caption)
    backend = services.backend()
    if run.active and run.master == backend.master_url():
        waiting = views.waiting_for_workers(run, backend.master_state(), scaling.load_settings(registry),
                                            Settings().size("EMBEDDECK_EXECUTOR_MEMORY"))
        if waiting:
            st.warning(views.literal(waiting))
    m = st.columns(4)
    m[0].metric("Rows done", f"{run.rows_done:,}")
    m[1].metric("Rows/s", f"{run.rows_per_s:.1f}")
    m[2].metric("Skipped", f"{run.rows_skipped:,}")
    # A master URL is too long for a metric's large type (it showed "spark://127.…"): it goes in the caption.
    m[3].metric("Duration", format_duration(run.duration_s()))
    st.caption(f"Master: {views.literal(run.master or '—')}")
    if in_process(run.master):
        st.caption("Cost: none of the cluster's workers; it ran in its driver's own process on the launching host")
    elif run.started_at is not None:
        st.caption(f"Cost: {scaling.cost(registry, run, backend.pricing()).label()}")
    samples = registry.samples(run_id)
    if samples:
        st.plotly_chart(charts.throughput_figure(samples), width="stretch")
    if run.error:
        st.error(f"Error: {views.literal(run.error)}")
    if run.active:
        if run.ui_url:
            st.markdown(f"[Spark UI of this run]({run.ui_url})")
        if run.cancel_requested:
            st.caption("Cancelling: the run's Spark jobs stop within seconds.")
        elif st.button("Cancel run"):
            lifecycle.cancel(run_id, registry)  # asks and returns; this view shows the run settle
            st.toast(f"{run_id}: cancel requested")
    elif st.button("Rerun"):
        rerun(run)
    st.subheader("All runs")
    runs = registry.list()
    st.dataframe(pd.DataFrame([views.run_row(r) for r in runs]), hide_index=True, width="stretch")
    widgets.keep_pace("runs", LIVE_EVERY_S, any(r.active for r in runs))


live(run_id)
