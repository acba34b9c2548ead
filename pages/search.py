"""Search: query text → top-k rows with scores, the model used and the latency."""

import pandas as pd
import streamlit as st

from dashboard import shell, views, widgets
from jobs.core.errors import EmbedDeckError
from jobs.embed.search import search, timings_line
from jobs.store import db

shell.open_page()
st.title("Similarity search")
url, engine = widgets.pick_connection()
targets = db.list_targets(engine)
if not targets:
    st.info("No embedded tables yet: launch a run first.")
    st.stop()
target = st.selectbox("Target table", targets)
with st.form("search"):
    query = st.text_input("Query", placeholder="waterproof hiking boots")
    k = st.slider("Top k", 1, 50, 5)
    go = st.form_submit_button("Search", type="primary")
if go:
    try:
        result = search(url, target, query, k=k)
    except EmbedDeckError as exc:
        st.error(views.literal(exc))
    else:
        for w in result.warnings:
            st.warning(views.literal(w))
        st.caption(f"model {views.literal(result.model)} · {timings_line(result)}")
        # A static table: k is small, and the rows stay readable text (copyable, visible to browser tests).
        st.table(pd.DataFrame(views.hit_rows(result.hits), index=range(1, len(result.hits) + 1)))
