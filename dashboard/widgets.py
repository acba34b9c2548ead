"""Widgets shared by pages."""

from __future__ import annotations

import sqlalchemy as sa
import streamlit as st

from dashboard import services, views
from jobs.core.errors import EmbedDeckError
from jobs.store import connections, db


def pick_connection() -> tuple[str, sa.Engine]:
    """Connection selectbox (passwords redacted); stops the page with the reason when it cannot connect."""
    conns = services.configured_connections()
    name = st.selectbox("Connection", list(conns), format_func=lambda n: connections.label(n, conns[n]))
    try:
        return conns[name], db.check_connection(conns[name])
    except EmbedDeckError as exc:
        st.error(views.literal(exc))
        st.stop()
        raise


IDLE_EVERY_S = 15.0


def live_every(view: str, live_s: float) -> float:
    """The interval a live view's fragment ticks at: live_s while something it shows moves, IDLE_EVERY_S when
    nothing does (kept per browser session by keep_pace)."""
    return st.session_state.get(f"{view}_every_s", live_s)


def keep_pace(view: str, live_s: float, moving: bool) -> None:
    """Set the view's pace for what it shows: every fragment tick costs Streamlit's server about 0.1 s of CPU
    whatever it draws, and an idle page ticking every 3 s kept 4 % of a core (AMX Xeon). A fragment's interval is
    fixed when its page runs, so a change runs the page again."""
    had, want = live_every(view, live_s), live_s if moving else IDLE_EVERY_S
    st.session_state[f"{view}_every_s"] = want
    if had != want:
        st.rerun(scope="app")
