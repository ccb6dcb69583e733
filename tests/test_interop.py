"""loralab as a drop-in for PEFT's LoRA, on every architecture of tests/model_zoo.py, checked against PEFT on the same
model: inject with the usual targets and with "all-linear" runs and counts trainable parameters as PEFT does, starts
at the pretrained output, adapters load both ways with equal outputs (modules_to_save included), and Trainer
checkpoints hold the adapter only and resume to the factors an uninterrupted run ends with."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from loralab import (
    AdapterFormatWarning,
    LoraConfig,
    check_identity,
    inject,
    load_adapter,
    lora_layers,
    save_adapter,
    trainable_summary,
)
from loralab.inject import saved_modules
from model_zoo import ARCHS, BY_NAME, build, main_output

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
ARCH = pytest.mark.parametrize("arch", ARCHS, ids=[a.name for a in ARCHS])
RANK, ALPHA = 4, 8


@pytest.fixture(autouse=True)
def _quiet(one_thread):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # PEFT's and transformers' notes on tiny configs; tests assert their warnings
        yield


def inputs(arch):
    return arch.inputs(torch.Generator().manual_seed(0))


@torch.no_grad()
def output(model, arch):
    return main_output(model(**inputs(arch))).float()


def ours(arch, targets=None, **kw):
    return LoraConfig(rank=RANK, alpha=ALPHA, targets=arch.targets if targets is None else targets,
                      modules_to_save=arch.modules_to_save, **kw)


def pefts(arch, targets):
    return peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets if isinstance(targets, str) else
                           list(targets), modules_to_save=list(arch.modules_to_save) or None, task_type=arch.peft_task)


@torch.no_grad()
def trained(model):
    """Every adapter tensor and module to save (loralab's or PEFT's) moved off its init, as after training."""
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


@ARCH
def test_usual_targets_run_start_at_the_pretrained_output_and_count_like_peft(arch):
    model = build(arch)
    before = output(model, arch)
    inject(model, ours(arch))
    after = output(model, arch)   # the model's own code reads its wrapped layers' attributes (T5 wo.weight, ...)
    assert torch.allclose(after, before, atol=1e-5) and check_identity(model, **inputs(arch)) < 1e-5
    if arch.peft_targets is not None:   # PEFT has another meaning for some of them: count the rest
        model = inject(build(arch), ours(arch, arch.same_in_peft))
    pm = peft.get_peft_model(build(arch), pefts(arch, arch.same_in_peft))
    assert sorted(lora_layers(model)) == sorted(pm.targeted_module_names)
    assert trainable_summary(model).trainable == pm.get_nb_trainable_parameters()[0]


@ARCH
def test_all_linear_selects_what_peft_does(arch):
    if not arch.all_linear:
        with pytest.raises(ValueError, match="left none to adapt"):   # PEFT refuses too: all modules excluded
            inject(build(arch), ours(arch, "all-linear"))
        pytest.skip(f"{arch.name}: its only linear layer is the head, so all-linear adapts nothing (checked above)")
    model = build(arch)
    before = output(model, arch)
    inject(model, ours(arch, "all-linear"))
    assert torch.allclose(output(model, arch), before, atol=1e-5)
    pm = peft.get_peft_model(build(arch), pefts(arch, "all-linear"))
    assert sorted(lora_layers(model)) == sorted(pm.targeted_module_names)
    assert trainable_summary(model).trainable == pm.get_nb_trainable_parameters()[0]


@ARCH
def test_a_loralab_adapter_loads_in_peft_and_back(arch, tmp_path):
    model = trained(inject(build(arch), ours(arch, arch.same_in_peft)))
    want = output(model, arch)
    save_adapter(model, tmp_path)
    in_peft = peft.PeftModel.from_pretrained(build(arch), tmp_path).eval()
    torch.testing.assert_close(output(in_peft, arch), want, atol=1e-5, rtol=1e-4)
    back = load_adapter(build(arch), tmp_path)
    torch.testing.assert_close(output(back, arch), want, atol=1e-6, rtol=1e-5)
    assert sorted(saved_modules(back, back.lora_config)) == sorted(saved_modules(model, model.lora_config))


@ARCH
def test_a_peft_adapter_loads_in_loralab(arch, tmp_path):
    pm = trained(peft.get_peft_model(build(arch), pefts(arch, arch.same_in_peft))).eval()
    pm.save_pretrained(tmp_path)
    back = load_adapter(build(arch), tmp_path)
    torch.testing.assert_close(output(back, arch), output(pm, arch), atol=1e-5, rtol=1e-4)
    assert all(p.requires_grad for m in saved_modules(back, back.lora_config).values() for p in m.parameters())


@pytest.mark.parametrize("name", ["convnext-depthwise", "cnn-grouped"])
def test_grouped_convs_save_in_loralabs_form_and_reload(name, tmp_path):
    """Grouped convs, whose PEFT LoRA is another function: loralab's own form, reloaded exactly (saving crashed)."""
    arch = BY_NAME[name]
    model = trained(inject(build(arch), ours(arch)))
    with pytest.warns(AdapterFormatWarning, match="PEFT cannot load"):
        save_adapter(model, tmp_path)
    torch.testing.assert_close(output(load_adapter(build(arch), tmp_path), arch), output(model, arch))


def train(arch, out, steps=4, resume=None):
    from transformers import TrainingArguments

    from loralab.hf import LoraTrainer

    model = inject(build(arch).train(), ours(arch, dropout=0.1), seed=0)
    examples = [arch.example(torch.Generator().manual_seed(i)) for i in range(8)]
    args = TrainingArguments(str(out), max_steps=steps, save_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], use_cpu=True, disable_tqdm=True, logging_strategy="no", seed=0,
                             dataloader_num_workers=0)
    LoraTrainer(model=model, args=args, train_dataset=examples).train(resume_from_checkpoint=resume)
    return model


@ARCH
def test_trainer_checkpoints_hold_the_adapter_only_and_resume_exactly(arch, tmp_path):
    whole = train(arch, tmp_path / "whole")
    ckpt = tmp_path / "whole" / "checkpoint-2"
    files = {p.name for p in ckpt.iterdir()}
    assert not files & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}, files
    weights = ckpt / ("adapter_model.safetensors" if "adapter_model.safetensors" in files else
                      "loralab_adapter.safetensors")
    adapter_bytes = 4 * sum(p.numel() for p in whole.parameters() if p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for m in saved_modules(whole, whole.lora_config).values()
                  for b in m.buffers())
    assert adapter_bytes <= weights.stat().st_size <= adapter_bytes + buffers + 32 * 1024   # + the JSON header
    resumed = train(arch, tmp_path / "resumed", resume=str(ckpt))
    mine, theirs = dict(whole.named_parameters()), dict(resumed.named_parameters())
    for name, p in mine.items():
        if p.requires_grad:
            assert torch.equal(p, theirs[name]), name
    first = load_adapter(build(arch), ckpt)   # a checkpoint is an adapter directory
    assert sorted(lora_layers(first)) == sorted(lora_layers(whole))


def test_a_pefts_adapter_with_a_rank_above_the_head_size_loads():
    """PEFT's all-linear without a task type adapts a 3-class head at r = 4 > 3 and saves it; loralab used to refuse
    it ("rank 4 exceeds min(d_in, d_out) = 3")."""
    arch = BY_NAME["bert-classifier"]
    pm = trained(peft.get_peft_model(build(arch), peft.LoraConfig(r=RANK, target_modules="all-linear"))).eval()
    assert "classifier" in pm.targeted_module_names
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        pm.save_pretrained(d)
        back = load_adapter(build(arch), d)
    assert lora_layers(back)["classifier"].rank == RANK
    torch.testing.assert_close(output(back, arch), output(pm, arch), atol=1e-5, rtol=1e-4)


def test_wrapped_layers_answer_the_models_attribute_reads():
    """The reads that crashed: get_input_embeddings().weight, Whisper's conv1.stride, T5's wo.weight, ViT's
    projection.weight; each is the base's tensor, which appears once in the state dict."""
    llama = inject(build(BY_NAME["llama"]), ours(BY_NAME["llama"]))
    emb = llama.get_input_embeddings()
    assert emb in lora_layers(llama).values() and emb.weight is emb.base_layer.weight
    whisper = inject(build(BY_NAME["whisper"]), ours(BY_NAME["whisper"]))
    assert whisper.model.encoder.conv1.stride == (1,)
    t5 = inject(build(BY_NAME["t5"]), ours(BY_NAME["t5"]))
    wo = t5.encoder.block[0].layer[1].DenseReluDense.wo
    assert wo.weight.dtype == torch.float32
    assert "encoder.block.0.layer.1.DenseReluDense.wo.weight" not in t5.state_dict()
    vit = inject(build(BY_NAME["vit-classifier"]), ours(BY_NAME["vit-classifier"]))
    assert vit.vit.embeddings.patch_embeddings.projection.weight.shape == (32, 3, 4, 4)


def test_the_adapter_config_names_the_models_task(tmp_path):
    for name, task in [("t5", "SEQ_2_SEQ_LM"), ("whisper", None), ("bert-classifier", "SEQ_CLS"),
                       ("llama", "CAUSAL_LM"), ("vit-classifier", None)]:
        arch = BY_NAME[name]
        save_adapter(inject(build(arch), ours(arch, arch.same_in_peft)), tmp_path / name)
        assert json.loads((tmp_path / name / "adapter_config.json").read_text())["task_type"] == task, name


def test_a_depthwise_peft_adapter_is_refused_as_pefts_meaning():
    arch = BY_NAME["convnext-depthwise"]
    pm = peft.get_peft_model(build(arch), peft.LoraConfig(r=16, target_modules=["dwconv"]))   # r: a multiple of groups
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        pm.save_pretrained(d)
        target = build(arch)
        with pytest.raises(ValueError, match=r"PEFT weights for conv .*dwconv.*'groups': 8.*load this adapter "
                                             r"with PEFT"):
            load_adapter(target, d)
    assert not lora_layers(target)
