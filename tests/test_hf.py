"""The Hugging Face stack: save_pretrained of an injected model, Trainer checkpoints (and TRL's), init_peft."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from core_helpers import perturb, tiny_gpt2, tiny_llama
from loralab import (
    AdapterError,
    IdentityWarning,
    LoraConfig,
    init_peft,
    init_schemes,
    inject,
    load_adapter,
    lora_layers,
    merge,
    unload,
)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
X = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _quiet(one_thread):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def logits(model, ids=X):
    with torch.no_grad():
        return model(ids).logits


# ---- save_pretrained ------------------------------------------------------------------------------------------------

def test_save_pretrained_of_gpt2_with_its_tied_head_adapted_writes_the_adapter(tmp_path):
    """It used to write the full model (and raise on GPT-2's shared lm_head/wte tensors); now the adapter, which
    loads back to the same model, and after unload the model saves itself whole again."""
    base = tiny_gpt2()
    model = inject(copy.deepcopy(base), LoraConfig(rank=4, targets=["wte", "c_attn"]))
    perturb(model)
    model.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "loralab.json"]
    assert torch.allclose(logits(load_adapter(copy.deepcopy(base), tmp_path / "adapter")), logits(model), atol=1e-6)
    twin = copy.deepcopy(model)   # the hook follows the copy: it saves the copy's adapter
    with torch.no_grad():
        lora_layers(twin)["transformer.h.0.attn.c_attn"].lora_B.add_(1.0)
    twin.save_pretrained(tmp_path / "twin")
    assert torch.allclose(logits(load_adapter(copy.deepcopy(base), tmp_path / "twin")), logits(twin), atol=1e-6)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())   # untie, to merge
    plain = unload(model)
    plain.save_pretrained(tmp_path / "full")
    assert (tmp_path / "full" / "model.safetensors").exists()
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "full").eval()
    assert torch.allclose(logits(reloaded), logits(plain), atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    ({"push_to_hub": True}, r"save it with model.save_pretrained\(dir\), then upload dir"),
    ({"state_dict": {}}, "FSDP/DeepSpeed"),
])
def test_save_pretrained_refuses_what_it_cannot_honour_with_the_fix(tmp_path, kwargs, match):
    model = inject(tiny_llama(), LoraConfig(rank=4, targets=["q_proj"]))
    with pytest.raises(AdapterError, match=match):
        model.save_pretrained(tmp_path, **kwargs)
    merge(model)
    with pytest.raises(AdapterError, match=r"call unmerge\(model\) to save the adapter, or unload\(model\)"):
        model.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())


# ---- Trainer --------------------------------------------------------------------------------------------------------

class Tokens(torch.utils.data.Dataset):
    def __init__(self, vocab: int, n: int = 16, t: int = 8):
        self.ids = torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def training_args(out, **kw):
    return transformers.TrainingArguments(str(out), **{
        "max_steps": 4, "save_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "report_to": [],
        "use_cpu": True, "disable_tqdm": True, "logging_strategy": "no", "seed": 0, "dataloader_num_workers": 0, **kw})


def test_a_trainer_checkpoint_is_an_adapter_from_pretrained_and_load_adapter_load(tmp_path, tiny_lm_dir):
    """AutoModelForCausalLM.from_pretrained(checkpoint) silently re-initialised the adapted layers of a full-model
    checkpoint; an adapter checkpoint names its base, so transformers (with PEFT) loads base + adapter."""
    from loralab.hf import LoraTrainer

    auto = transformers.AutoModelForCausalLM
    model = inject(auto.from_pretrained(tiny_lm_dir), LoraConfig(rank=4, targets=["q_proj", "v_proj"]))
    LoraTrainer(model=model, args=training_args(tmp_path), train_dataset=Tokens(model.config.vocab_size)).train()
    model.eval()
    ckpt = tmp_path / "checkpoint-4"
    assert torch.allclose(logits(auto.from_pretrained(ckpt).eval()), logits(model), atol=1e-5)
    assert torch.allclose(logits(load_adapter(auto.from_pretrained(tiny_lm_dir), ckpt)), logits(model), atol=1e-6)


def test_the_plain_trainer_writes_adapter_checkpoints(tmp_path):
    model = inject(tiny_llama(), LoraConfig(rank=4, targets=["q_proj", "v_proj"]))
    transformers.Trainer(model=model, args=training_args(tmp_path, max_steps=2), train_dataset=Tokens(64)).train()
    files = {p.name for p in (tmp_path / "checkpoint-2").iterdir()}
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files


def test_load_best_model_at_end_loads_the_best_adapter(tmp_path):
    from loralab.hf import LoraTrainer

    model = inject(tiny_llama(), LoraConfig(rank=4, targets=["q_proj", "v_proj"]))
    args = training_args(tmp_path, max_steps=6, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                         metric_for_best_model="loss", greater_is_better=True)   # "best": the first, highest loss
    trainer = LoraTrainer(model=model, args=args, train_dataset=Tokens(64), eval_dataset=Tokens(64, n=4))
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-2")
    best, last = (lora_layers(load_adapter(tiny_llama(), tmp_path / c)) for c in ("checkpoint-2", "checkpoint-6"))
    for name, layer in lora_layers(model).items():
        assert torch.equal(layer.lora_B, best[name].lora_B) and not torch.equal(layer.lora_B, last[name].lora_B), name


def test_trls_sft_trainer_with_the_mixin_resumes_exactly(tmp_path, tiny_lm_dir):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from loralab.hf import AdapterTrainerMixin

    class SFT(AdapterTrainerMixin, trl.SFTTrainer):
        pass

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_lm_dir)
    data = datasets.Dataset.from_dict({"text": [f"message {i}: hello there, how are you?" for i in range(16)]})

    def run(out, resume=None):
        model = inject(transformers.AutoModelForCausalLM.from_pretrained(tiny_lm_dir),
                       LoraConfig(rank=4, targets=["q_proj", "v_proj"]), seed=0)
        args = trl.SFTConfig(str(out), max_steps=4, save_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], use_cpu=True, disable_tqdm=True, logging_strategy="no", seed=0,
                             max_length=16, dataloader_num_workers=0)
        SFT(model=model, args=args, train_dataset=data, processing_class=tokenizer).train(resume_from_checkpoint=resume)
        return model

    whole = run(tmp_path / "whole")
    assert not (tmp_path / "whole" / "checkpoint-2" / "model.safetensors").exists()
    resumed = run(tmp_path / "resumed", str(tmp_path / "whole" / "checkpoint-2"))
    for name, layer in lora_layers(whole).items():
        assert torch.equal(layer.lora_B, lora_layers(resumed)[name].lora_B), name


# ---- init_peft ------------------------------------------------------------------------------------------------------

PEFT_TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]
PLAIN = sorted(n for n, s in init_schemes().items() if not s.modifies_base)


def peft_model(r=4, **kw):
    return peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=r, lora_alpha=8, target_modules=PEFT_TARGETS, **kw))


def peft_factors(pm):
    out = {}
    for name, module in pm.get_base_model().named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            a = module.lora_embedding_A["default"] if module.lora_embedding_A else module.lora_A["default"].weight
            b = module.lora_embedding_B["default"] if module.lora_embedding_B else module.lora_B["default"].weight
            out[name] = (a.detach().clone(), b.detach().clone())
    return out


@pytest.mark.parametrize("init", PLAIN)
def test_init_peft_writes_the_factors_inject_would(init):
    """Same base, rank, α and seed: bit-identical factors to loralab's own inject (so the same distribution),
    embeddings included; the output stays the base's for every scheme that promises it."""
    pm = init_peft(peft_model(), init, seed=5)
    ours = inject(tiny_llama(), LoraConfig(rank=4, alpha=8, init=init, targets=PEFT_TARGETS), seed=5)
    theirs = peft_factors(pm)
    assert sorted(theirs) == sorted(lora_layers(ours))
    for name, layer in lora_layers(ours).items():
        assert torch.equal(theirs[name][0], layer.lora_A) and torch.equal(theirs[name][1], layer.lora_B), name
    delta = (logits(pm) - logits(tiny_llama())).abs().max().item()
    assert (delta < 1e-5) == init_schemes()[init].preserves_output


def test_init_peft_survives_pefts_save_and_load(tmp_path):
    pm = init_peft(peft_model(), "orthogonal-qr-match", seed=0)
    with torch.no_grad():   # one training step's worth of change, so the file's content matters
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.add_(0.01)
    pm.save_pretrained(tmp_path)
    back, want = peft_factors(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)), peft_factors(pm)
    assert sorted(back) == sorted(want)
    assert all(torch.equal(x, y) for n in want for x, y in zip(back[n], want[n]))


@pytest.mark.parametrize("init, kw, match", [
    ("pissa", {}, r"rewrites the base weight.*init_lora_weights='pissa'"),
    ("orthogonal-qr-match", {"r": 3}, "needs an even rank"),
    ("standard", {"use_dora": True}, "uses DoRA"),
    ("no-such-scheme", {}, "unknown init scheme"),
])
def test_init_peft_refuses_what_it_cannot_do_and_changes_nothing(init, kw, match):
    pm = peft_model(**{"r": 4, **kw})
    before = peft_factors(pm)
    with pytest.raises(ValueError, match=match):
        init_peft(pm, init)
    assert all(torch.equal(x, y) for n in before for x, y in zip(before[n], peft_factors(pm)[n]))


def test_init_peft_warns_when_the_scheme_breaks_identity():
    with pytest.warns(IdentityWarning, match="random-both"):
        init_peft(peft_model(), "random-both")
