"""Launch: pick connection, source, columns, target and model, then start a run."""

import pandas as pd
import streamlit as st

from dashboard import services, shell, views, widgets
from jobs import lifecycle
from jobs.core.errors import EmbedDeckError
from jobs.core.spec import DEFAULT_BATCH_SIZE, DEFAULT_MODEL, RunSpec
from jobs.store import db, registry, scaling

shell.open_page()
st.title("Launch an embedding run")
url, engine = widgets.pick_connection()
# EmbedDeck's own tables are no source: on ACA the registry's share the users' database.
own_tables = {db.targets_table.name, *registry.metadata.tables, *scaling.metadata.tables}
tables = [t for t in db.list_tables(engine) if t not in own_tables]
if not tables:
    st.info("This database has no tables yet. Load the demo with `python -m jobs seed-demo`.")
    st.stop()

source = st.selectbox("Source table or view", tables, index=tables.index("products") if "products" in tables else 0)
table = db.reflect(engine, source, "source")
cols = [c.name for c in table.c]
keys = db.key_columns(engine, table)
key_cols = sorted((c.name for c in table.c if db.is_key_type(c.type)), key=lambda c: c not in keys) or cols
text_guess = next((c for c in ("description", "text", "body", "content") if c in cols), cols[-1])
c1, c2 = st.columns(2)
id_column = c1.selectbox("Id column (the table's key)", key_cols)
text_column = c2.selectbox("Text column", cols, index=cols.index(text_guess))
target = st.text_input("Target table (created when missing)", value=f"{source}_embeddings")
c3, c4, c5 = st.columns(3)
model = c3.text_input("Model (name or local directory)", value=DEFAULT_MODEL)
batch_size = c4.number_input("Batch size (rows at most)", 1, 4096, DEFAULT_BATCH_SIZE)
mode = c5.selectbox("Mode", ["incremental", "full"])
master = st.text_input("Spark master", value=lifecycle.resolve_master())

spec = RunSpec(db_url=url, source=source, id_column=id_column, text_column=text_column, target=target,
               model=model, batch_size=int(batch_size), mode=mode, master=master, launched_by="dashboard")
try:
    spec, checked = lifecycle.validate(spec)
    pending = db.count_unembedded(engine, checked, spec.model)  # as the run records it
    need = "row still needs" if pending == 1 else "rows still need"
    st.caption(f"{pending:,} {need} a vector of {views.literal(model)} (new rows or another model; "
               "changed texts are found when the run plans).")
    shown = db.texts(engine, table, table.c[id_column], table.c[text_column], limit=5)  # as a run embeds them
    st.dataframe(pd.DataFrame({id_column: list(shown), text_column: list(shown.values())}),
                 hide_index=True, width="stretch")
    if id_column not in keys:
        st.warning(views.literal(f"{id_column!r} is not a key of {source!r} (no primary key or unique constraint on "
                                 "it alone): the run checks that every row has an id of its own and fails in planning "
                                 "if not."))
    valid = True
except EmbedDeckError as exc:
    st.error(views.literal(exc))
    valid = False

if st.button("Launch run", type="primary", disabled=not valid):
    try:
        run_id = lifecycle.record(spec, services.registry())  # validated above, in this same run of the page
    except EmbedDeckError as exc:
        st.error(views.literal(exc))
    else:
        st.session_state["selected_run"] = run_id
        st.success(f"Run {run_id} launched.")
        st.switch_page("pages/runs.py")
