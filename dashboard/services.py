"""Long-lived services shared by the pages, created once per dashboard process."""

from __future__ import annotations

import streamlit as st

from cluster.controller import Controller
from cluster.local import LocalCluster
from jobs import connections
from jobs.runs import Registry


@st.cache_resource
def registry() -> Registry:
    return Registry()


@st.cache_resource
def cluster() -> LocalCluster:
    return LocalCluster()


@st.cache_resource
def controller() -> Controller:
    return Controller(cluster(), registry())


def secrets() -> dict:
    """st.secrets as a dict; empty when there is no secrets file."""
    try:
        return st.secrets.to_dict()
    except Exception:
        return {}


def configured_connections() -> dict[str, str]:
    return connections.configured(secrets())


def default_master() -> str:
    """The local cluster's master when it is up (the autoscaler feeds it workers), else local[*]."""
    c = cluster()
    return c.master_url() if c.master_alive() else "local[*]"
