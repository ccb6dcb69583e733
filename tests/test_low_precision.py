"""Half precision (bfloat16 / float16) and the CUDA-only paths, exercised on CPU wherever they can be.

CI trains float32 on CPU; on CUDA the lab loads the model in bfloat16 and trains under bf16 autocast. The tests here
run the same code with half-precision weights on CPU, under ``torch.autocast("cpu")``, and on the ``meta`` device.
Tolerances are in units of the dtype's rounding (``EPS``), never float32 ones. ``gpu`` tests skip without CUDA.
"""

from __future__ import annotations

import copy
import math
import warnings
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

from core_helpers import LAYER_CASES, make_case, perturb, tiny_llama
from loralab import (
    LoraConfig,
    check_identity,
    init_schemes,
    inject,
    load_adapter,
    lora_layers,
    merge,
    save_adapter,
    unmerge,
)
from loralab.inject import validate
from loralab.lab.config.grid import RunSpec
from loralab.lab.run import loss as loss_mod
from loralab.lab.run.loss import fused_loss_ok, sequence_losses
from loralab.layers import Dropout, Linear

HALF = [torch.bfloat16, torch.float16]
EPS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}   # unit roundoff
SCHEMES = sorted(init_schemes())
PLAIN = [s for s in SCHEMES if not init_schemes()[s].modifies_base]          # factors never read the weight values
KEEPS = [s for s in PLAIN if init_schemes()[s].preserves_output]
MOVES = [s for s in SCHEMES if init_schemes()[s].modifies_base]               # pissa, olora
TARGETS = ["q_proj", "v_proj", "o_proj"]

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _even_rank(init: str) -> int:
    return 4 if init_schemes()[init].even_rank else 3


def _inject(model, init="standard", rank=4, targets=TARGETS, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # IdentityWarning of random-both: on purpose here
        return inject(model, LoraConfig(rank=rank, alpha=2 * rank, init=init, targets=targets, **kw), seed=3)


def _half_case(name: str, dtype):
    model, x = make_case(name)
    return model.to(dtype), (x.to(dtype) if x.is_floating_point() else x)


def _ids(batch=2, seq=12, vocab=64, seed=0):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ---- layers and inject ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_half_base_keeps_float32_adapters_and_is_exact_at_init(case, dtype):
    model, x = _half_case(case, dtype)
    with torch.no_grad():
        ref = model(x)
    _inject(model, targets=["0"], rank=2)
    layer = lora_layers(model)["0"]
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32          # documented: half bases keep fp32
    assert layer.lora_A.device == layer.base_layer.weight.device
    assert layer.base_layer.weight.dtype == dtype                             # the frozen base is not upcast
    with torch.no_grad():
        out = model(x)
    assert out.dtype == dtype
    assert torch.equal(out, ref)                                              # standard: B = 0, so exactly the base


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_half_merged_matches_unmerged(case, dtype):
    model, x = _half_case(case, dtype)
    _inject(model, targets=["0"], rank=2)
    perturb(model, std=0.3)
    layer = lora_layers(model)["0"]
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        unmerged = model(x).float()
        merge(model)
        merged = model(x).float()
        unmerge(model)
        again = model(x).float()
    assert merged.dtype == unmerged.dtype
    scale = unmerged.abs().max().item()
    delta_out = (unmerged - model[0].base_layer(x).float()).abs().max().item()   # what the adapter contributes
    assert delta_out > 32 * EPS[dtype] * scale                                # far above the tolerances below
    # merged ≈ unmerged up to rounding the merged weight (and the sums) to ``dtype``
    assert (merged - unmerged).abs().max().item() <= 8 * EPS[dtype] * scale
    # unmerge gives back the base up to a few roundings of |W + ΔW| (documented: exact up to the dtype's rounding)
    bound = 2 * EPS[dtype] * (w0.float().abs() + layer.delta_weight().detach().abs()).max().item()
    assert (layer.base_layer.weight.float() - w0.float()).abs().max().item() <= bound
    assert (again - unmerged).abs().max().item() <= 8 * EPS[dtype] * scale


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("init", PLAIN)
def test_factors_do_not_depend_on_the_base_dtype(init, dtype):
    """Same config + seed -> bit-identical adapter whatever the base's dtype (factors are drawn on CPU in fp32)."""
    rank = _even_rank(init)
    ref = _inject(tiny_llama(), init, rank)
    half = _inject(tiny_llama().to(dtype), init, rank)
    for (name, a), b in zip(lora_layers(ref).items(), lora_layers(half).values()):
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B), name


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("init", KEEPS + MOVES)
def test_half_identity_at_init(init, dtype):
    base = tiny_llama().to(dtype)
    ids = _ids()
    with torch.no_grad():
        ref = base(input_ids=ids).logits.float()
    model = _inject(copy.deepcopy(base), init, _even_rank(init))
    with torch.no_grad():
        out = model(input_ids=ids).logits.float()
    scale = ref.abs().max().item()
    if init in MOVES:   # W <- round(W - s·B0·A0): one rounding of the residual per weight, then the sums
        assert (out - ref).abs().max().item() <= 8 * EPS[dtype] * scale
    else:               # B·A = 0 (or ~1e-7 for the orthogonal pairs): below half an ulp of the logits
        assert (out - ref).abs().max().item() <= 2 * EPS[dtype] * scale
    assert check_identity(model, input_ids=ids) <= 8 * EPS[dtype] * scale


def test_validate_works_on_a_meta_half_model():
    with torch.device("meta"):
        model = tiny_llama().to(torch.bfloat16)
    targets = validate(model, LoraConfig(rank=4, targets=TARGETS))
    assert len(targets) == 2 * len(TARGETS)
    layer = Linear(model.model.layers[0].self_attn.q_proj, 4, 8.0)            # built on the base's device
    assert layer.lora_A.device.type == "meta" and layer.lora_A.dtype == torch.float32


def test_inject_on_a_meta_model_for_a_shape_only_scheme():
    """Schemes that read only the weight's shape never copy it off its device, so a meta model can be adapted
    (the dry run's path); a scheme that reads the weight says which module it could not read."""
    with torch.device("meta"):
        model = tiny_llama().to(torch.bfloat16)
    inject(model, LoraConfig(rank=4, targets=TARGETS, init="orthogonal-qr-match"))
    assert all(layer.lora_B.device.type == "meta" for layer in lora_layers(model).values())
    with torch.device("meta"):
        model = tiny_llama()
    with pytest.raises(ValueError, match="'pissa' reads the weight of 'model.layers.0.self_attn.q_proj'.*meta"):
        inject(model, LoraConfig(rank=4, targets=TARGETS, init="pissa"))
    assert not lora_layers(model)   # all or nothing


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_cpu_dropout_on_half_inputs_is_unbiased(dtype):
    torch.manual_seed(0)
    drop = Dropout(0.25).train()
    x = torch.rand(256, 256).add_(0.5).to(dtype)
    y = drop(x)
    assert y.dtype == dtype and y.shape == x.shape
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01
    torch.testing.assert_close(y[kept].float(), (x[kept] * drop.scale).float(), rtol=2 * EPS[dtype], atol=0)
    assert y.float().mean().item() == pytest.approx(x.float().mean().item(), rel=0.02)


def test_non_cpu_dropout_branch_keeps_shape_and_dtype():
    drop = Dropout(0.1).train()
    x = torch.empty(3, 7, 16, dtype=torch.bfloat16, device="meta")   # F.dropout, the path CUDA takes
    y = drop(x)
    assert y.device.type == "meta" and y.dtype == torch.bfloat16 and y.shape == x.shape


def test_lora_under_autocast_saves_its_input_without_a_copy():
    """Under autocast a half input goes to the matmul as it is: no float32 round trip that autocast would turn into
    a fresh bf16 copy for autograd to keep (one per adapted layer, q/k/v each their own), solo or packed."""
    from loralab.lab.run.pack import PackedLayer

    base = nn.Linear(64, 64).to(torch.bfloat16).requires_grad_(False)
    solo = Linear(base, 4, 8.0)
    packed = PackedLayer([Linear(base, 4, 8.0) for _ in range(2)])
    for layer in (solo, packed):
        x = torch.randn(8, 5, 64, dtype=torch.bfloat16, requires_grad=True)
        saved: list = []
        with torch.autocast("cpu", dtype=torch.bfloat16), \
                torch.autograd.graph.saved_tensors_hooks(lambda t, keep=saved.append: keep(t) or t, lambda t: t):
            y = layer(x)
        assert y.dtype == torch.bfloat16
        activations = [t for t in saved if t.numel() == x.numel()]
        assert activations and all(t.data_ptr() == x.data_ptr() for t in activations), type(layer).__name__


# ---- io --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_adapter_round_trip(tmp_path, dtype):
    from safetensors.torch import load_file

    base = tiny_llama().to(dtype)
    model = _inject(copy.deepcopy(base))
    perturb(model, std=0.1)
    save_adapter(model, tmp_path)
    assert {t.dtype for t in load_file(str(tmp_path / "adapter_model.safetensors")).values()} == {torch.float32}
    back = load_adapter(copy.deepcopy(base), tmp_path)
    for (name, a), b in zip(lora_layers(model).items(), lora_layers(back).values()):
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B), name
        assert b.lora_A.dtype == torch.float32 and b.base_layer.weight.dtype == dtype
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("init", MOVES)
def test_bf16_portable_export_loads_on_the_unmodified_base(tmp_path, init):
    base = tiny_llama().to(torch.bfloat16)
    model = _inject(copy.deepcopy(base), init)
    perturb(model, std=0.05)
    save_adapter(model, tmp_path, portable=True)
    back = load_adapter(copy.deepcopy(base), tmp_path)
    ids = _ids()
    with torch.no_grad():
        want, got = model(input_ids=ids).logits.float(), back(input_ids=ids).logits.float()
    assert (got - want).abs().max().item() <= 8 * EPS[torch.bfloat16] * want.abs().max().item()


def test_bf16_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama().to(torch.bfloat16)
    model = _inject(copy.deepcopy(base))
    perturb(model, std=0.1)
    save_adapter(model, tmp_path)
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ids = _ids()
    with torch.no_grad():
        want, got = model(input_ids=ids).logits.float(), in_peft(input_ids=ids).logits.float()
    assert (got - want).abs().max().item() <= 16 * EPS[torch.bfloat16] * want.abs().max().item()


# ---- the fused loss ------------------------------------------------------------------------------------------------

def _grads(model, ids, fused, amp):
    model.zero_grad(set_to_none=True)
    seen = {}

    def keep(module, args, out):   # the backbone's last hidden state and, after backward, its gradient
        out.last_hidden_state.retain_grad()
        seen["h"] = out.last_hidden_state

    hook = model.model.register_forward_hook(keep)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            per_seq = sequence_losses(model, ids, fused=fused)
        (per_seq * torch.arange(1, len(ids) + 1)).sum().backward()
    finally:
        hook.remove()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    return per_seq.detach(), grads, seen["h"]


@pytest.mark.parametrize("dtype,amp", [(torch.bfloat16, False), (torch.float16, False), (torch.float32, True),
                                       (torch.bfloat16, True)], ids=["bf16", "fp16", "fp32-autocast", "bf16-autocast"])
def test_fused_loss_matches_plain_in_low_precision(dtype, amp, monkeypatch):
    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", 64 * 7)   # 7 rows per chunk: several chunks and a ragged last one
    model = _inject(tiny_llama().to(dtype), "random-both").train()   # B != 0: every factor has a gradient
    ids = _ids(3, 17)
    plain, g_plain, h_plain = _grads(model, ids, False, amp)
    fused, g_fused, h_fused = _grads(model, ids, True, amp)
    eps = EPS[torch.bfloat16] if amp else EPS[dtype]
    assert fused.dtype == plain.dtype == torch.float32
    assert h_fused.grad is not None and h_fused.grad.dtype == h_fused.dtype == h_plain.grad.dtype
    torch.testing.assert_close(fused, plain, rtol=4 * eps, atol=0)
    assert ((g_fused - g_plain).norm() / g_plain.norm()).item() <= 8 * eps
    _, g_ref, _ = _grads(_inject(tiny_llama(), "random-both").train(), ids, False, False)   # fp32 oracle
    assert ((g_fused - g_ref).norm() / g_ref.norm()).item() <= 8 * eps


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_fused_loss_ok_accepts_a_half_model(dtype):
    model = _inject(tiny_llama().to(dtype))
    assert fused_loss_ok(model, _ids(1, 32))


# ---- the lab -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def half_assets(tiny_lm_dir, chat_jsonl):
    """``{dtype: (frozen tiny model in dtype, packed data)}``, loaded as a sweep loads them (model.dtype=...)."""
    from loralab.lab.config.schema import DataConfig, ModelConfig
    from loralab.lab.run.data import load_data
    from loralab.lab.run.models import load_model

    out = {}
    for name in ("bfloat16", "float16"):
        model, tokenizer = load_model(ModelConfig(name=str(tiny_lm_dir), dtype=name), "cpu")
        model.requires_grad_(False)
        out[name] = model, load_data(DataConfig(source=str(chat_jsonl), seq_len=32, max_train_chunks=16,
                                                max_eval_chunks=4), tokenizer)
    return out


def _run_cfg(init="standard", lr=2e-3, seed=0, **train_kw):
    from loralab.lab.config.schema import RunConfig, TrainConfig

    return RunConfig(lora=LoraConfig(rank=4, alpha=8.0, init=init, targets=("q_proj", "v_proj", "down_proj")),
                     train=TrainConfig(**{"max_steps": 3, "batch_size": 2, "eval_every": 2, "device": "cpu",
                                          "lr": lr, "seed": seed, **train_kw}))


def _specs(cfgs):
    return [RunSpec(f"p{k}", {}, c) for k, c in enumerate(cfgs)]


def _losses(store):
    return [m.get("loss", m.get("eval_loss")) for m in store.metrics()]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_model_lab_run_trains_with_finite_losses(half_assets, tmp_path, dtype):
    from loralab.lab.run.train import train_pack, train_run
    from loralab.lab.store import RunStore

    model, data = half_assets[dtype]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    solo_store = RunStore(tmp_path / "solo")
    solo = train_run(RunSpec("solo", {}, _run_cfg()), solo_store, base_model=model, data=data, progress=False)
    assert solo.status == "ok" and solo.steps == 3
    losses = _losses(solo_store)
    assert len(losses) == 3 + 3 and all(math.isfinite(x) for x in losses)   # 3 train + evals at 0, 2, 3
    assert solo_store.diagnostics()["identity_max_abs"] == 0.0
    assert abs(solo.final_eval_loss - solo.initial_eval_loss) > 0             # the fp32 adapters did move
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # the base is never touched
    # a pack of two (dropout 0) in half precision: run 0 trains exactly as alone
    stores = [RunStore(tmp_path / f"pack{k}") for k in range(2)]
    packed = train_pack(_specs([_run_cfg(), _run_cfg("reversed", seed=1)]), stores, base_model=model, data=data,
                        progress=False)
    assert [r.status for r in packed] == ["ok", "ok"]
    rtol = 4 * EPS[getattr(torch, dtype)]
    torch.testing.assert_close(torch.tensor(_losses(stores[0])), torch.tensor(losses), rtol=rtol, atol=0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_lab_run_under_autocast_as_on_cuda(half_assets, tiny_assets, tmp_path, dtype):
    """The loop as CUDA runs it (bf16 autocast around every forward, the fused loss, the in-GEMM update), on CPU."""
    from loralab.lab.run import train
    from loralab.lab.store import RunStore

    model, data = half_assets[dtype] if dtype != "float32" else tiny_assets
    stores = [RunStore(tmp_path / f"r{k}") for k in range(3)]
    with torch.autocast("cpu", dtype=torch.bfloat16):   # as a bf16 model runs anyway: around every forward
        solo = train.train_run(RunSpec("s", {}, _run_cfg()), stores[0], base_model=model, data=data, progress=False)
        packed = train.train_pack(_specs([_run_cfg(), _run_cfg("reversed", seed=1)]), stores[1:], base_model=model,
                                  data=data,
                              progress=False)
    assert [r.status for r in (solo, *packed)] == ["ok"] * 3
    assert all(math.isfinite(x) for s in stores for x in _losses(s))
    assert solo.final_eval_loss != solo.initial_eval_loss
    torch.testing.assert_close(torch.tensor(_losses(stores[1])), torch.tensor(_losses(stores[0])),
                               rtol=4 * EPS[torch.bfloat16], atol=0)


@pytest.mark.parametrize("init", MOVES)
def test_step0_identity_of_a_base_modifying_init_is_rounding_only(half_assets, tmp_path, init):
    from loralab.lab.run.train import train_run
    from loralab.lab.store import RunStore

    model, data = half_assets["bfloat16"]
    store = RunStore(tmp_path)
    train_run(RunSpec("r", {}, _run_cfg(init, max_steps=1)), store, base_model=model, data=data, progress=False)
    with torch.no_grad():
        scale = model(input_ids=data.eval[:2]).logits.abs().max().item()
    assert store.diagnostics()["identity_max_abs"] <= 8 * EPS[torch.bfloat16] * scale


def test_a_pack_that_ran_out_of_memory_is_freed_before_its_halves_train(half_assets, tmp_path, monkeypatch):
    from loralab.lab.run import train
    from loralab.lab.run.assets import Assets
    from loralab.lab.store import SweepStore
    from loralab.lab.sweep.local import run_pack

    real, held, alive = train.train_pack, [], []

    def oom_for_packs(runs, *args, **kwargs):
        if len(runs) > 1:
            activations = torch.empty(1 << 16)   # stands for what a real pack holds on the GPU when it fails
            held.append(weakref.ref(activations))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        alive.append(any(ref() is not None for ref in held))
        return real(runs, *args, **kwargs)

    monkeypatch.setattr(train, "train_pack", oom_for_packs)
    assets = Assets()
    assets.get = lambda run: half_assets["bfloat16"]
    jobs = [RunSpec(f"j{k}", {}, _run_cfg(lr=lr, max_steps=1)) for k, lr in enumerate([1e-3, 2e-3])]
    store = SweepStore(tmp_path)
    results = run_pack(jobs, [store.run(j.run_id) for j in jobs], assets, progress=False)
    assert [r.status for r in results] == ["ok", "ok"] and len(alive) == 2
    assert not any(alive)


# ---- the benchmark's GPU invocation --------------------------------------------------------------------------------

def test_bench_step_compile_variant_really_compiles(tiny_lm_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_step

    graphs = []

    def counting(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=counting))
    torch._dynamo.reset()
    args = bench_step.parse(["--model", str(tiny_lm_dir), "--rank", "4", "--dropout", "0"])
    base = bench_step.build_model(args.model, torch.device("cpu"), torch.float32).requires_grad_(False)
    _, loss = bench_step.loralab_variant(base, args, True)
    loss(_ids(2, 16, vocab=200)).backward()
    torch._dynamo.reset()
    assert graphs


# ---- CUDA only -----------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_factors_are_bit_identical_to_cpu():
    for init in SCHEMES:
        rank = _even_rank(init)
        cpu = _inject(tiny_llama(), init, rank)
        gpu = _inject(tiny_llama().cuda(), init, rank)
        for (name, a), b in zip(lora_layers(cpu).items(), lora_layers(gpu).values()):
            assert b.lora_A.is_cuda and torch.equal(a.lora_A, b.lora_A.cpu()) and torch.equal(a.lora_B, b.lora_B.cpu())
            assert torch.equal(a.base_layer.weight, b.base_layer.weight.cpu()), (init, name)


@pytest.mark.gpu
def test_gpu_autocast_step_with_fused_adamw():
    model = _inject(tiny_llama().cuda().to(torch.bfloat16), "random-both", dropout=0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    before = [p.detach().clone() for p in params]
    ids = _ids(2, 16).cuda()
    model.eval()   # no dropout: the two paths see the same function
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        fused, plain = sequence_losses(model, ids, fused=True), sequence_losses(model, ids, fused=False)
    assert fused.dtype == torch.float32 and torch.isfinite(fused).all()
    torch.testing.assert_close(fused, plain, rtol=4 * EPS[torch.bfloat16], atol=0)
    model.train()   # dropout's CUDA branch
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = sequence_losses(model, ids, fused=True).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in params)
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, params))


@pytest.mark.gpu
def test_gpu_packed_forward_does_not_synchronize():
    from loralab.lab.run.pack import PackedLayer

    base = nn.Linear(64, 64, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    layer = PackedLayer([Linear(base, 4, 8.0) for _ in range(3)])
    layer.active = [0, 2]
    x = torch.randn(4, 8, 64, device="cuda", dtype=torch.bfloat16)
    layer(x)   # warm-up: allocator, kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            layer(x).float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_gpu_lab_run_in_auto_dtype(tiny_lm_dir, chat_jsonl, tmp_path):
    from loralab.lab.config.schema import DataConfig, ModelConfig
    from loralab.lab.run.data import load_data
    from loralab.lab.run.models import load_model
    from loralab.lab.run.train import train_pack
    from loralab.lab.store import RunStore

    model, tokenizer = load_model(ModelConfig(name=str(tiny_lm_dir)), "cuda")   # auto -> bfloat16 on CUDA
    assert next(model.parameters()).dtype == torch.bfloat16
    model.requires_grad_(False)
    data = load_data(DataConfig(source=str(chat_jsonl), seq_len=32, max_train_chunks=16, max_eval_chunks=4), tokenizer)
    cfgs = [_run_cfg(device="cuda"), _run_cfg("reversed", seed=1, device="cuda")]
    stores = [RunStore(tmp_path / f"r{k}") for k in range(2)]
    results = train_pack(_specs(cfgs), stores, base_model=model, data=data, progress=False)
    assert [r.status for r in results] == ["ok", "ok"] and all(r.device.startswith("cuda") for r in results)
    assert all(math.isfinite(x) for s in stores for x in _losses(s))


@pytest.mark.gpu
def test_gpu_float16_model_trains_in_float16(tiny_lm_dir, chat_jsonl, tmp_path):
    from loralab.lab.config.schema import DataConfig, ModelConfig
    from loralab.lab.run.data import load_data
    from loralab.lab.run.models import load_model
    from loralab.lab.run.train import train_run
    from loralab.lab.store import RunStore

    model, tokenizer = load_model(ModelConfig(name=str(tiny_lm_dir), dtype="float16"), "cuda")
    model.requires_grad_(False)
    data = load_data(DataConfig(source=str(chat_jsonl), seq_len=32, max_train_chunks=16, max_eval_chunks=4), tokenizer)
    seen = set()
    import transformers.models.llama.modeling_llama as llama

    hook = nn.modules.module.register_module_forward_hook(
        lambda m, args, out: seen.add(out.last_hidden_state.dtype) if isinstance(m, llama.LlamaModel) else None)
    try:
        result = train_run(RunSpec("r", {}, _run_cfg(device="cuda", max_steps=1)), RunStore(tmp_path),
                           base_model=model, data=data,
                           progress=False)
    finally:
        hook.remove()
    assert result.status == "ok" and seen == {torch.float16}
