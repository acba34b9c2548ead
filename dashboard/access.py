"""Who may use the dashboard. Streamlit has no sign-in of its own and the dashboard is the whole control
plane, so beyond loopback it runs behind one: `proxy` trusts the user header an authenticating proxy sets
(ACA's built-in authentication sets X-MS-CLIENT-PRINCIPAL-NAME and strips it from clients), `oidc` uses
Streamlit's own st.login with the [auth] section of the secrets file."""

from __future__ import annotations

import streamlit as st

from jobs.core.settings import Settings


def signed_in() -> bool:
    """Whether the configured authentication says who the user is (always, with `none`)."""
    settings = Settings()
    mode = settings.raw("EMBEDDECK_DASHBOARD_AUTH")
    if mode == "none":
        return True
    if mode == "proxy":
        return bool(st.context.headers.get(settings.raw("EMBEDDECK_DASHBOARD_AUTH_HEADER")))
    if mode == "oidc":
        return bool(st.user.is_logged_in)
    return False


def require_sign_in() -> None:
    """Stop the page unless signed_in(), saying how to sign in."""
    if signed_in():
        return
    settings = Settings()
    mode = settings.raw("EMBEDDECK_DASHBOARD_AUTH")
    if mode == "proxy":
        header = settings.raw("EMBEDDECK_DASHBOARD_AUTH_HEADER")
        st.error(f"Sign-in required: this dashboard is served only behind an authenticating proxy ({header}).")
    elif mode == "oidc":
        st.button("Log in", on_click=st.login)
    else:
        st.error("EMBEDDECK_DASHBOARD_AUTH must be none, proxy or oidc")
    st.stop()
