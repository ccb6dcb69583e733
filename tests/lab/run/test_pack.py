"""Packing: K runs on one shared base give what K solo runs give, a diverged run leaves the others undisturbed, and
only runs that may share a base are packed together."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
from torch import nn

from loralab import inject
from loralab.config import LoraConfig
from loralab.lab.config.grid import RunSpec
from loralab.lab.config.schema import ModelConfig, RunConfig, SweepConfig, TrainConfig
from loralab.lab.run.pack import Pack, PackedLayer, pack_key
from loralab.lab.run.train import train_pack, train_run
from loralab.lab.store import RunStore
from loralab.lab.sweep.plan import SweepPlan
from tiny_sweep import tiny_sweep, write_toml

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def assets(tiny_assets):
    return tiny_assets


def run_cfg(init="standard", lr=1e-3, seed=0, rank=4, dropout=0.0, **train_kw) -> RunConfig:
    return RunConfig(lora=LoraConfig(rank=rank, alpha=8.0, init=init, targets=("q_proj", "v_proj", "down_proj"),
                                     dropout=dropout),
                     train=TrainConfig(**{"max_steps": 5, "batch_size": 2, "eval_every": 2, "device": "cpu",
                                          "lr": lr, "seed": seed, **train_kw}))


def metrics(store: RunStore) -> tuple[list[float], list[float]]:
    m = store.metrics()
    return [x["loss"] for x in m if x["kind"] == "train"], [x["eval_loss"] for x in m if x["kind"] == "eval"]


def solo_and_packed(assets, tmp_path, cfgs):
    model, data = assets
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        solo = [train_run(RunSpec(f"s{i}", {}, c), RunStore(tmp_path / f"solo{i}"), base_model=model, data=data,
                          progress=False) for i, c in enumerate(cfgs)]
        stores = [RunStore(tmp_path / f"pack{i}") for i in range(len(cfgs))]
        packed = train_pack([RunSpec(f"p{i}", {}, c) for i, c in enumerate(cfgs)], stores, base_model=model,
                            data=data, progress=False)
    return solo, packed, [RunStore(tmp_path / f"solo{i}") for i in range(len(cfgs))], stores


def test_packed_runs_match_solo_runs(assets, tmp_path):
    """Different inits, learning rates, seeds and clipping in one pack: each run's losses equal its solo run's."""
    cfgs = [run_cfg("standard", 1e-3, 0), run_cfg("reversed", 3e-3, 1, grad_clip=0.5),
            run_cfg("orthogonal-qr-match", 2e-3, 2, warmup_ratio=0.4), run_cfg("random-both", 1e-3, 3)]
    solo, packed, solo_stores, pack_stores = solo_and_packed(assets, tmp_path, cfgs)
    for s, p, ss, ps in zip(solo, packed, solo_stores, pack_stores):
        assert (p.status, p.steps, p.tokens, p.pack_size) == (s.status, s.steps, s.tokens, 4)
        (s_train, s_eval), (p_train, p_eval) = metrics(ss), metrics(ps)
        assert len(p_train) == 5 and len(p_eval) == len(s_eval) == 4   # step 0, 2, 4, 5
        torch.testing.assert_close(torch.tensor(p_train), torch.tensor(s_train), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.tensor(p_eval), torch.tensor(s_eval), rtol=1e-4, atol=1e-5)
        sd, pd = ss.diagnostics(), ps.diagnostics()
        assert sd["layers"].keys() == pd["layers"].keys()
        for name, layer in sd["layers"].items():
            for key, value in layer.items():
                assert pd["layers"][name][key] == pytest.approx(value, rel=1e-4, abs=1e-9), (name, key)
        assert pd["identity_max_abs"] == pytest.approx(sd["identity_max_abs"], rel=1e-4, abs=1e-6)


def test_a_diverged_run_leaves_the_pack_and_the_others_go_on(assets, tmp_path):
    steps = dict(max_steps=12, warmup_ratio=0.0)
    cfgs = [run_cfg("standard", 1e-3, 0, **steps), run_cfg("random-both", 1e3, 0, **steps),
            run_cfg("reversed", 2e-3, 1, **steps)]
    solo, packed, solo_stores, pack_stores = solo_and_packed(assets, tmp_path, cfgs)
    assert [r.status for r in packed] == ["ok", "diverged", "ok"] == [r.status for r in solo]
    assert packed[1].steps < 12 and packed[1].steps == solo[1].steps
    for k in (0, 2):   # the survivors trained exactly as they would have alone
        torch.testing.assert_close(torch.tensor(metrics(pack_stores[k])[0]), torch.tensor(metrics(solo_stores[k])[0]),
                                   rtol=1e-4, atol=1e-5)
    last_eval = [m for m in pack_stores[1].metrics() if m["kind"] == "eval"][-1]
    assert last_eval["step"] == packed[1].steps   # the diverged state is evaluated, not carried over


def test_a_blown_up_run_that_continues_leaves_the_others_undisturbed(assets, tmp_path):
    """on_divergence = "continue": the blown-up run trains to the end beside the others (its losses may be NaN),
    and they train, and evaluate chunk by chunk, exactly as they would have alone."""
    steps = dict(max_steps=8, warmup_ratio=0.0, on_divergence="continue")
    cfgs = [run_cfg("standard", 1e-3, 0, **steps), run_cfg("random-both", 1e3, 0, **steps),
            run_cfg("reversed", 2e-3, 1, **steps)]
    solo, packed, solo_stores, pack_stores = solo_and_packed(assets, tmp_path, cfgs)
    assert [r.status for r in packed] == ["ok", "diverged", "ok"] == [r.status for r in solo]
    assert [r.steps for r in packed] == [8, 8, 8] and packed[1].diverged_at_step == solo[1].diverged_at_step
    for k in (0, 2):
        torch.testing.assert_close(torch.tensor(metrics(pack_stores[k])[0]), torch.tensor(metrics(solo_stores[k])[0]),
                                   rtol=1e-4, atol=1e-5)
        p, s = pack_stores[k].eval_chunks().splits["eval"], solo_stores[k].eval_chunks().splits["eval"]
        torch.testing.assert_close(torch.tensor(p.final), torch.tensor(s.final), rtol=1e-4, atol=1e-5)


def test_packed_layer_rows_belong_to_their_runs():
    """Linear (batched bmm path) and Embedding (per-run path): rows of run k see run k's adapter only."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 6))
    configs = [LoraConfig(rank=2, targets=("0", "1"), init="random-both", alpha=a) for a in (1.0, 4.0, 2.0)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        solos = [inject(copy.deepcopy(base), c, seed=i) for i, c in enumerate(configs)]
        runs = [RunConfig(lora=c, train=TrainConfig(seed=i)) for i, c in enumerate(configs)]
        pack = Pack(base, runs)
    assert isinstance(pack.model[0], PackedLayer) and isinstance(pack.model[1], PackedLayer)
    ids = torch.randint(0, 20, (2, 5))
    out = pack.model(ids.repeat(3, 1))
    for k, solo in enumerate(solos):
        torch.testing.assert_close(out[2 * k:2 * k + 2], solo(ids))
    pack.set_active([2, 0])
    out = pack.model(ids.repeat(2, 1))
    torch.testing.assert_close(out[:2], solos[2](ids))
    torch.testing.assert_close(out[2:], solos[0](ids))


def test_pack_key_separates_what_cannot_share_a_base():
    base = run_cfg()
    assert pack_key(base) == pack_key(run_cfg("reversed", 5e-3, 3, grad_clip=0.3))
    assert pack_key(base) != pack_key(run_cfg(rank=8))              # other shapes
    assert pack_key(base) != pack_key(run_cfg(max_steps=7))         # another schedule length
    assert pack_key(run_cfg("pissa")) != pack_key(run_cfg("pissa", lr=2e-3))   # rewrites the base: always alone
    with pytest.raises(ValueError, match="differ only in"):
        Pack(nn.Linear(2, 2), [base, run_cfg(rank=8)])


def test_plan_packs_groups_in_grid_order_and_splits_by_size(monkeypatch):
    jobs = [RunSpec(f"j{i}", {}, cfg) for i, cfg in enumerate(
        [run_cfg(lr=1e-3, device="auto"), run_cfg(lr=2e-3, device="auto"), run_cfg(rank=2, device="auto"),
         run_cfg(lr=3e-3, device="auto"), run_cfg("pissa", device="auto"), run_cfg("pissa", lr=2e-3, device="auto")])]

    def packs(size: int) -> list[list[RunSpec]]:
        return SweepPlan(SweepConfig(name="p", out_dir="unused", pack=size), tuple(jobs)).packs(jobs)

    assert [[j.run_id for j in p] for p in packs(2)] == [["j0", "j1"], ["j3"], ["j2"], ["j4"], ["j5"]]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert [len(p) for p in packs(0)] == [1] * 6      # auto: no packing on CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [len(p) for p in packs(0)] == [3, 1, 1, 1]  # auto on CUDA: fill the device


def test_a_sweep_with_packs_resumes_like_one_without(tmp_path, tiny_lm_dir, chat_jsonl):
    """pack = 3 through the CLI: every run gets a result with its pack size; a rerun trains nothing."""
    from loralab.cli import main
    from loralab.lab.store import SweepStore

    grid = {"lora.init": ["standard", "reversed"], "train.lr": [1e-3, 2e-3]}
    cfg = write_toml(tmp_path / "s.toml", tiny_sweep(tiny_lm_dir, chat_jsonl, tmp_path / "out", name="p", grid=grid,
                                                     **{"pack": 3, "data.max_train_chunks": 16,
                                                        "data.max_eval_chunks": 4}))
    assert main(["sweep", str(cfg), "--no-progress"]) == 0
    results = [r.result for r in SweepStore(tmp_path / "out").records()]
    assert len(results) == 4 and all(r.status == "ok" for r in results)
    assert sorted(r.pack_size for r in results) == [1, 3, 3, 3]
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("result.json")}
    assert main(["sweep", str(cfg), "--no-progress"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("result.json")} == mtimes


def test_a_pack_that_runs_out_of_gpu_memory_is_split(assets, tmp_path, monkeypatch):
    """Simulated: packs of more than 2 runs raise CUDA OOM; the sweep trains them in halves and loses no run."""
    from loralab.lab.run import train
    from loralab.lab.run.assets import Assets
    from loralab.lab.store import SweepStore
    from loralab.lab.sweep.local import run_pack

    real, sizes = train.train_pack, []

    def small_packs_only(runs, *args, **kwargs):
        sizes.append(len(runs))
        if len(runs) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(runs, *args, **kwargs)

    monkeypatch.setattr(train, "train_pack", small_packs_only)
    model, data = assets
    ready = Assets()
    ready.get = lambda run: (model, data)
    jobs = [RunSpec(f"j{i}", {}, run_cfg(lr=lr, max_steps=2)) for i, lr in enumerate([1e-3, 2e-3, 3e-3, 4e-3, 5e-3])]
    store = SweepStore(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = run_pack(jobs, [store.run(j.run_id) for j in jobs], ready, progress=False)
    assert sizes == [5, 2, 3, 1, 2]   # 5 -> 2 + 3 -> 3 -> 1 + 2
    assert [r.run_id for r in results] == [j.run_id for j in jobs]
    assert all(r.status == "ok" and r.steps == 2 for r in results)
    assert all(store.run(j.run_id).result().status == "ok" for j in jobs)


@pytest.mark.parametrize("init, shares", [("standard", True), ("pissa", False)])
def test_a_pack_shares_the_frozen_base_unless_an_init_rewrites_it(assets, init, shares):
    """No second copy of the base on the device; pissa/olora write the base, so their pack gets its own copy and the
    shared base stays as it was."""
    model, _ = assets
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pack = Pack(model, [run_cfg(init)])
    base_ptrs = {t.data_ptr() for t in model.parameters()}
    pack_ptrs = {t.data_ptr() for n, t in pack.model.named_parameters() if "lora_" not in n}
    assert (pack_ptrs <= base_ptrs) == shares and bool(pack_ptrs & base_ptrs) == shares
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    assert all(not isinstance(m, PackedLayer) for m in model.modules())   # the base's module tree is untouched


@pytest.fixture(scope="module")
def assets_4bit(tiny_lm_dir, chat_jsonl):
    pytest.importorskip("bitsandbytes")
    from loralab.lab.config.schema import DataConfig, ModelConfig
    from loralab.lab.run.data import load_data
    from loralab.lab.run.models import load_model

    model, tokenizer = load_model(ModelConfig(name=str(tiny_lm_dir), quantize="nf4"), "cpu")
    model.requires_grad_(False)
    data = load_data(DataConfig(source=str(chat_jsonl), seq_len=32, max_train_chunks=16, max_eval_chunks=4), tokenizer)
    return model, data


def test_packed_runs_on_a_4bit_base_share_it_and_match_solo_runs(assets_4bit, tmp_path):
    model, _ = assets_4bit
    cfgs = [run_cfg("standard", 1e-3, 0), run_cfg("reversed", 3e-3, 1)]
    pack = Pack(model, cfgs)
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert all(m.model.layers[0].self_attn.q_proj.base_layer.weight is weight for m in pack.models)  # no copy
    solo, packed, solo_stores, pack_stores = solo_and_packed(assets_4bit, tmp_path, cfgs)
    for s, p, ss, ps in zip(solo, packed, solo_stores, pack_stores):
        assert (p.status, p.steps, p.pack_size) == (s.status, s.steps, 2) == ("ok", 5, 2)
        (s_train, s_eval), (p_train, p_eval) = metrics(ss), metrics(ps)
        torch.testing.assert_close(torch.tensor(p_train), torch.tensor(s_train), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.tensor(p_eval), torch.tensor(s_eval), rtol=1e-4, atol=1e-5)


def test_a_4bit_base_is_packed_apart_from_a_float_one():
    dense = run_cfg()
    four_bit = dataclasses.replace(dense, model=ModelConfig(quantize="nf4"))
    assert pack_key(four_bit) != pack_key(dense)
    assert pack_key(four_bit) == pack_key(dataclasses.replace(four_bit, train=dataclasses.replace(
        four_bit.train, lr=5e-3, seed=3)))
