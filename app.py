"""EmbedDeck dashboard: `streamlit run app.py`."""

import streamlit as st

st.set_page_config(page_title="EmbedDeck", page_icon="🧭", layout="wide")
page = st.navigation([
    st.Page("pages/launch.py", title="Launch", icon="🚀", default=True),
    st.Page("pages/runs.py", title="Runs", icon="📋"),
    st.Page("pages/cluster.py", title="Cluster", icon="🖥️"),
    st.Page("pages/search.py", title="Search", icon="🔎"),
])
page.run()
