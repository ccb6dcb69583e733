"""``identity_table``: measured against the model's own logits before injection, not the adapter's idea of them."""

import dataclasses

from loralab import inits
from loralab.config import LoraConfig
from loralab.inits import Factors
from loralab.lab.config.schema import ModelConfig
from loralab.lab.studies.identity import identity_table


def test_a_base_rewriting_scheme_that_breaks_the_model_is_caught(tiny_lm_dir, one_thread, monkeypatch):
    """A pissa whose residual forgets to subtract s·B·A reconstructs itself perfectly (adapters_disabled gives
    residual + s·B0·A0), so only a comparison with the untouched model shows the broken promise."""
    real = inits.get_scheme("pissa")

    def forgetful(w, rank, *, scale, g):
        f = real.fn(w, rank, scale=scale, g=g)
        return Factors(a=f.a, b=f.b, base=w.clone())

    monkeypatch.setitem(inits._REGISTRY, "pissa", dataclasses.replace(real, fn=forgetful))
    rows = {r["init"]: r for r in identity_table(ModelConfig(name=str(tiny_lm_dir)),
                                                 LoraConfig(rank=4, targets=["q_proj", "v_proj"]))}
    assert rows["pissa"]["ok"] is False and rows["pissa"]["relative"] > 1e-3
    assert rows["olora"]["ok"] is True and rows["olora"]["relative"] < 1e-4
    assert rows["standard"]["max_abs_logits"] == 0.0
