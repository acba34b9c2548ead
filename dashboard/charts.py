"""Plotly figure builders: pure functions from data to figures."""

from __future__ import annotations

import plotly.graph_objects as go

from jobs.core.samples import SAMPLE_GAP_S

# The legend above the plot, right of the title: below it, it covered the time axis's date line.
_LAYOUT = {"height": 300, "margin": {"l": 10, "r": 10, "t": 40, "b": 10},
           "legend": {"orientation": "h", "yanchor": "bottom", "y": 1.02, "xanchor": "right", "x": 1}}


def throughput_figure(samples: list[tuple]) -> go.Figure:
    """Rows done and rows/s over time for one run; samples are (time, rows_done, rows_per_s)."""
    fig = go.Figure()
    times = [s[0] for s in samples]
    fig.add_trace(go.Scatter(x=times, y=[s[2] for s in samples], name="rows/s", mode="lines"))
    fig.add_trace(go.Scatter(x=times, y=[s[1] for s in samples], name="rows done", mode="lines",
                             yaxis="y2", line={"dash": "dot"}))
    fig.update_layout(_LAYOUT, title="Throughput", yaxis={"title": "rows/s", "rangemode": "tozero"},
                      yaxis2={"title": "rows done", "overlaying": "y", "side": "right", "rangemode": "tozero"})
    return fig



def with_gaps(samples: list[dict], gap_s: float = SAMPLE_GAP_S) -> list[dict]:
    """The samples with an empty point wherever none came for gap_s: the line breaks there. Drawn through, a
    cluster stopped overnight at 2 workers showed 2 workers all night."""
    out: list[dict] = []
    for s in samples:
        if out and (s["at"] - out[-1]["at"]).total_seconds() > gap_s:
            out.append({"at": out[-1]["at"], "workers": None, "desired": None})
        out.append(s)
    return out


def workers_figure(samples: list[dict], events: list[dict]) -> go.Figure:
    """Workers (actual and desired) over time, with each scaling decision marked and explained; the lines break
    where the controller was not sampling."""
    fig = go.Figure()
    samples = with_gaps(samples)
    at = [s["at"] for s in samples]
    fig.add_trace(go.Scatter(x=at, y=[s["workers"] for s in samples], name="workers", mode="lines",
                             line={"shape": "hv"}, connectgaps=False))
    fig.add_trace(go.Scatter(x=at, y=[s["desired"] for s in samples], name="desired", mode="lines",
                             line={"shape": "hv", "dash": "dot"}, connectgaps=False))
    if events:
        fig.add_trace(go.Scatter(
            x=[e["at"] for e in events], y=[e["to_workers"] for e in events], name="decisions",
            mode="markers", marker={"size": 10, "symbol": "diamond"},
            text=[f"{e['source']}: {e['from_workers']}→{e['to_workers']} ({e['reason']})" for e in events],
            hoverinfo="text+x"))
    fig.update_layout(_LAYOUT, title="Workers over time", yaxis={"title": "workers", "rangemode": "tozero", "dtick": 1})
    return fig
