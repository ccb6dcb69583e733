"""The laboratory: configs, models, data, training runs, sweeps, a results store and reports (never imported by the library)."""
