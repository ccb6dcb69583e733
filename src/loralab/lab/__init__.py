"""The laboratory: configs, models, data, training runs, sweeps, a results store, reports and studies.

Never imported by the library. Where things go: a config field in ``config/schema.py``; a way to train in ``run/``;
an executor in ``sweep/`` (named in ``sweep/run.py``); what a run writes or reads back in ``store.py``; a table or plot
in ``report/``; a study in ``studies/``, built on the modules above; machine facts (devices, versions, paths) in
``runtime.py``.
"""
