"""Plotly figure builders: pure functions from data to figures."""

from __future__ import annotations

import plotly.graph_objects as go


def throughput_figure(samples: list[tuple]) -> go.Figure:
    """Rows done and rows/s over time for one run; samples are (time, rows_done, rows_per_s)."""
    fig = go.Figure()
    times = [s[0] for s in samples]
    fig.add_trace(go.Scatter(x=times, y=[s[2] for s in samples], name="rows/s", mode="lines"))
    fig.add_trace(go.Scatter(x=times, y=[s[1] for s in samples], name="rows done", mode="lines",
                             yaxis="y2", line={"dash": "dot"}))
    fig.update_layout(height=300, margin={"l": 10, "r": 10, "t": 30, "b": 10}, title="Throughput",
                      yaxis={"title": "rows/s", "rangemode": "tozero"},
                      yaxis2={"title": "rows done", "overlaying": "y", "side": "right", "rangemode": "tozero"},
                      legend={"orientation": "h"})
    return fig


def workers_figure(samples: list[dict], events: list[dict]) -> go.Figure:
    """Workers (actual and desired) over time, with each scaling decision marked and explained."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[s["at"] for s in samples], y=[s["workers"] for s in samples], name="workers",
                             mode="lines", line={"shape": "hv"}))
    fig.add_trace(go.Scatter(x=[s["at"] for s in samples], y=[s["desired"] for s in samples], name="desired",
                             mode="lines", line={"shape": "hv", "dash": "dot"}))
    if events:
        fig.add_trace(go.Scatter(
            x=[e["at"] for e in events], y=[e["to_workers"] for e in events], name="decisions",
            mode="markers", marker={"size": 10, "symbol": "diamond"},
            text=[f"{e['source']}: {e['from_workers']}→{e['to_workers']} ({e['reason']})" for e in events],
            hoverinfo="text+x"))
    fig.update_layout(height=300, margin={"l": 10, "r": 10, "t": 30, "b": 10}, title="Workers over time",
                      yaxis={"title": "workers", "rangemode": "tozero", "dtick": 1}, legend={"orientation": "h"})
    return fig
