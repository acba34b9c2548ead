"""Runs: history, live progress with throughput and ETA, cancel, errors, rerun."""

from dataclasses import replace

import pandas as pd
import streamlit as st

from dashboard import charts, services, views
from jobs import connections, launcher
from jobs.errors import EmbedDeckError
from jobs.spec import RunSpec

st.title("Runs")
registry = services.registry()
registry.reconcile()
ids = [r.run_id for r in registry.list()]
if not ids:
    st.info("No runs yet. Start one on the Launch page.")
    st.stop()
chosen = st.session_state.get("selected_run")
run_id = st.selectbox("Run", ids, index=ids.index(chosen) if chosen in ids else 0)
st.session_state["selected_run"] = run_id


def rerun(run) -> None:
    stored = RunSpec.from_json(run.spec_json)
    url = connections.resolve(stored.db_url, services.configured_connections())
    if url is None:
        st.error(f"No configured connection matches {stored.db_url}; add it to the environment or secrets.")
        return
    try:
        new_id = launcher.launch(replace(stored, db_url=url, launched_by="dashboard"), registry)
    except EmbedDeckError as exc:
        st.error(str(exc))
        return
    st.session_state["selected_run"] = new_id
    st.rerun(scope="app")


@st.fragment(run_every=2)
def live(run_id: str) -> None:
    registry.reconcile()
    run = registry.get(run_id)
    frac, caption = views.run_progress(run)
    st.subheader(f"{run.run_id} · {run.state}")
    st.progress(frac, text=caption)
    m = st.columns(4)
    m[0].metric("Rows done", f"{run.rows_done:,}")
    m[1].metric("Rows/s", f"{run.rows_per_s:.1f}")
    m[2].metric("Skipped", f"{run.rows_skipped:,}")
    m[3].metric("Master", run.master or "—")
    samples = registry.samples(run_id)
    if samples:
        st.plotly_chart(charts.throughput_figure(samples), width="stretch")
    if run.error:
        st.error(f"Error: {run.error}")
    if run.active:
        if run.ui_url:
            st.markdown(f"[Spark UI of this run]({run.ui_url})")
        if st.button("Cancel run"):
            with st.spinner("cancelling…"):
                st.toast(f"{run_id}: {launcher.cancel(run_id, registry)}")
    elif st.button("Rerun"):
        rerun(run)
    st.subheader("All runs")
    st.dataframe(pd.DataFrame([views.run_row(r) for r in registry.list()]), hide_index=True, width="stretch")


live(run_id)
