"""Storage: database engines and catalog, targets and upserts, the run registry, scaling state, worker readings."""
