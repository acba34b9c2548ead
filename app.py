"""EmbedDeck dashboard: `streamlit run app.py`."""

import streamlit as st

from dashboard import services
from dashboard.access import require_sign_in

st.set_page_config(page_title="EmbedDeck", page_icon=":material/hub:", layout="wide")
require_sign_in()
services.settling()
page = st.navigation([
    st.Page("pages/launch.py", title="Launch", icon=":material/rocket_launch:", default=True),
    st.Page("pages/runs.py", title="Runs", icon=":material/list_alt:"),
    st.Page("pages/cluster.py", title="Cluster", icon=":material/dns:"),
    st.Page("pages/search.py", title="Search", icon=":material/search:"),
])
page.run()
