"""Plotly figure builders: pure functions from data to figures."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import plotly.graph_objects as go

from jobs.core.samples import SAMPLE_GAP_S

# The legend above the plot, right of the title: below it, it covered the time axis's date line.
_LAYOUT = {"height": 300, "margin": {"l": 10, "r": 10, "t": 40, "b": 10},
           "legend": {"orientation": "h", "yanchor": "bottom", "y": 1.02, "xanchor": "right", "x": 1}}
# The least time each chart's axis spans, ending at its last point: fitted to one point, or to a few taken at once,
# Plotly spread the axis over a fraction of a millisecond (ticks at 17:44:31.9782, .9783, …).
THROUGHPUT_SPAN_S = 60  # a run samples every 2 s
WORKERS_SPAN_S = 600  # the controller samples every 5 s; an operator reads minutes


def time_span(times: Sequence[dt.datetime], least_s: float, now: dt.datetime | None = None
              ) -> list[dt.datetime] | None:
    """The time axis's range when the points span less than least_s: least_s up to the last point, or to now where
    there is none (and a little beyond, so that a marker there shows whole); else None (Plotly fits the points)."""
    if not times and now is None:
        return None
    first, last = (min(times), max(times)) if times else (now, now)
    if (last - first).total_seconds() >= least_s:
        return None
    return [last - dt.timedelta(seconds=least_s), last + dt.timedelta(seconds=least_s / 50)]


def throughput_figure(samples: list[tuple]) -> go.Figure:
    """Rows done and rows/s over time for one run; samples are (time, rows_done, rows_per_s)."""
    fig = go.Figure()
    times = [s[0] for s in samples]
    fig.add_trace(go.Scatter(x=times, y=[s[2] for s in samples], name="rows/s", mode="lines"))
    fig.add_trace(go.Scatter(x=times, y=[s[1] for s in samples], name="rows done", mode="lines",
                             yaxis="y2", line={"dash": "dot"}))
    fig.update_layout(_LAYOUT, title="Throughput", yaxis={"title": "rows/s", "rangemode": "tozero"},
                      yaxis2={"title": "rows done", "overlaying": "y", "side": "right", "rangemode": "tozero"},
                      xaxis={"range": time_span(times, THROUGHPUT_SPAN_S)})
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


def workers_figure(samples: list[dict], events: list[dict], now: dt.datetime | None = None) -> go.Figure:
    """Workers (actual and desired) over time, with each scaling decision marked and explained; the lines break
    where the controller was not sampling. Without either, the axis shows the minutes up to now (naive UTC)."""
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
    fig.update_layout(_LAYOUT, title="Workers over time", yaxis={"title": "workers", "rangemode": "tozero", "dtick": 1},
                      xaxis={"type": "date", "range": time_span(at + [e["at"] for e in events], WORKERS_SPAN_S, now)})
    return fig
