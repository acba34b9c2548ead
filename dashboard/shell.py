"""What every page runs first: the layout, the sign-in and the server's settle loop.

Each page runs it itself rather than leaving it to app.py: while no session has yet reached app.py's
st.navigation, Streamlit serves a folder named `pages/` beside the entry script in its older multipage mode, which
runs a requested page's file (/cluster, on a fresh server's first request) without app.py, and so without its
sign-in (AppTest runs every page that way)."""

from __future__ import annotations

import streamlit as st

from dashboard import services
from dashboard.access import require_sign_in


def open_page() -> None:
    """Set the page up, and stop it unless the user is signed in."""
    st.set_page_config(page_title="EmbedDeck", page_icon=":material/hub:", layout="wide")
    require_sign_in()
    services.settling()
