"""Long-lived services shared by the pages, created once per dashboard process."""

from __future__ import annotations

import streamlit as st

from cluster import backends
from cluster.backend import Backend
from cluster.controller import Controller
from jobs.store import connections
from jobs.store.registry import Registry


@st.cache_resource
def registry() -> Registry:
    return Registry()


@st.cache_resource
def backend() -> Backend:
    """The cluster the configuration names (local processes by default, or ACA replicas)."""
    return backends.configured()


@st.cache_resource
def controller() -> Controller:
    return Controller(backend(), registry())


def configured_connections() -> dict[str, str]:
    """The connections of the secrets file (the one Streamlit reads too) and the environment."""
    return connections.configured()
