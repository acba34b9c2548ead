"""Long-lived services shared by the pages, created once per dashboard process."""

from __future__ import annotations

import threading

import streamlit as st

from cluster import backends
from cluster.backend import Backend
from cluster.controller import Controller
from jobs import lifecycle
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


@st.cache_resource(on_release=lambda stop: stop.set())
def settling() -> threading.Event:
    """This server's settle loop, started once; its stop event (clearing the cache stops it). A run launched here
    and left waiting for a slot starts when one frees, whether or not a page is open, also where no local
    autoscaler ticks (the dashboard's app on ACA)."""
    stop = threading.Event()
    threading.Thread(target=lifecycle.settle_forever, args=(registry(), stop), daemon=True,
                     name="embeddeck-settle").start()
    return stop
