"""Studies built on the lab: each a client of its config, run, store and report modules, never a parallel lab."""
