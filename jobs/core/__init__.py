"""The run's core, lowest layer: what a run is, its errors, settings and pure policies."""
