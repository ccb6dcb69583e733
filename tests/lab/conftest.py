"""Fixtures shared by the lab's tests."""

from __future__ import annotations

import pytest

from loralab.lab.run import train as train_mod


@pytest.fixture
def reversed_fails(monkeypatch):
    """``reversed`` runs raise in training, as a run with a bug would."""
    original = train_mod.train_pack

    def train_pack(specs, stores, **kwargs):
        if any(s.run.lora.init == "reversed" for s in specs):
            raise RuntimeError("boom in reversed")
        return original(specs, stores, **kwargs)

    monkeypatch.setattr(train_mod, "train_pack", train_pack)
    return monkeypatch
