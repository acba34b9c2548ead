"""Widgets shared by pages."""

from __future__ import annotations

import sqlalchemy as sa
import streamlit as st

from dashboard import services
from jobs.core.errors import EmbedDeckError
from jobs.store import connections, db


def pick_connection() -> tuple[str, sa.Engine]:
    """Connection selectbox (passwords redacted); stops the page with the reason when it cannot connect."""
    conns = services.configured_connections()
    name = st.selectbox("Connection", list(conns), format_func=lambda n: connections.label(n, conns[n]))
    try:
        return conns[name], db.check_connection(conns[name])
    except EmbedDeckError as exc:
        st.error(str(exc))
        st.stop()
        raise
