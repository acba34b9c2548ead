"""EmbedDeck dashboard, served by `python -m dashboard.server` (`make run` starts it)."""

import streamlit as st

from dashboard.access import signed_in

# Navigation first, even for a visitor who is not signed in (hidden from them): calling it ends Streamlit's older
# multipage mode for this server (dashboard/shell.py); each page then signs in and sets itself up.
page = st.navigation([
    st.Page("pages/launch.py", title="Launch", icon=":material/rocket_launch:", default=True),
    st.Page("pages/runs.py", title="Runs", icon=":material/list_alt:"),
    st.Page("pages/cluster.py", title="Cluster", icon=":material/dns:"),
    st.Page("pages/search.py", title="Search", icon=":material/search:"),
], position="sidebar" if signed_in() else "hidden")
page.run()
