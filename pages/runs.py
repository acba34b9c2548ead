"""Runs: history, live progress with throughput and ETA, cancel, errors, rerun."""

from dataclasses import replace

import pandas as pd
import streamlit as st

from dashboard import charts, connections, services, views
from jobs import launcher
from jobs.spec import RunSpec, SpecError

st.title("Runs")
registry = services.registry()
registry.reconcile()
runs = registry.list()
if not runs:
    st.info("No runs yet. Start one on the Launch page.")
    st.stop()

st.dataframe(pd.DataFrame([views.run_row(r) for r in runs]), hide_index=True, width="stretch")
ids = [r.run_id for r in runs]
chosen = st.session_state.get("selected_run")
run_id = st.selectbox("Run", ids, index=ids.index(chosen) if chosen in ids else 0)
st.session_state["selected_run"] = run_id


@st.fragment(run_every=2)
def live(run_id: str) -> None:
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
    if run.active and run.ui_url:
        st.markdown(f"[Spark UI of this run]({run.ui_url})")


live(run_id)
run = registry.get(run_id)
c1, c2 = st.columns(2)
if run.active and c1.button("Cancel run"):
    with st.spinner("cancelling…"):
        st.toast(f"{run_id}: {launcher.cancel(run_id, registry)}")
    st.rerun()
if not run.active and c2.button("Rerun"):
    stored = RunSpec.from_json(run.spec_json)
    url = connections.resolve(stored.db_url, services.configured_connections())
    if url is None:
        st.error(f"No configured connection matches {stored.db_url}; add it to the environment or secrets.")
    else:
        try:
            new_id = launcher.launch(replace(stored, db_url=url, launched_by="dashboard"), registry)
        except SpecError as exc:
            st.error(str(exc))
        else:
            st.session_state["selected_run"] = new_id
            st.rerun()
