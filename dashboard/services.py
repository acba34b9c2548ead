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


def secrets() -> dict:
    """st.secrets as a dict; empty when there is no secrets file."""
    try:
        return st.secrets.to_dict()
    except Exception:
        return {}


def configured_connections() -> dict[str, str]:
    return connections.configured(secrets())
