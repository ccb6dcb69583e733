"""Shared fixtures: a tiny offline causal LM, a small chat dataset, and the ``slow``/``gpu`` marker policy.

``slow`` tests run only with ``--runslow`` or ``-m slow`` (plain ``pytest`` stays at seconds); ``gpu`` tests
skip without CUDA.
The whole session uses a temporary ``$LORALAB_CACHE``, so no test writes to the user's cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import random

import pytest
import torch

TOPICS = ["the weather", "a good book", "dinner plans", "the weekend", "music", "a new job", "learning Python",
          "a trip to the sea", "coffee", "the garden"]
REPLIES = ["That sounds great!", "Tell me more.", "I am not sure about that.", "Me too, honestly.",
           "Why do you think so?", "Ha, that is funny.", "Let us talk about it later."]


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow (real SmolLM2, ~1 min)")


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--runslow") or "slow" in (config.getoption("markexpr") or "")   # -m slow asks too
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow (or -m slow)")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session", autouse=True)
def _float32_auto_on_cpu():
    """``model.dtype = auto`` computes in float32 on the CPU in every test, whatever this CPU can do: tests that
    compare numbers need one precision on every machine; tests of the bfloat16 path patch this themselves."""
    from loralab.lab import runtime

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runtime, "cpu_has_native_bf16", lambda: False)
        yield


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    old = os.environ.get("LORALAB_CACHE")
    os.environ["LORALAB_CACHE"] = str(tmp_path_factory.mktemp("loralab-cache"))
    yield
    if old is None:
        os.environ.pop("LORALAB_CACHE", None)
    else:
        os.environ["LORALAB_CACHE"] = old


def _tiny_tokenizer():
    """A byte-level tokenizer with no merges: 256 byte tokens, ``<|endoftext|>`` (EOS) and ``<pad>``; no training,
    so it is the same on every machine, and it encodes any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>")


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A directory with a seeded tiny LlamaForCausalLM (hidden 32, 2 layers, 4 heads / 2 KV heads, tied embeddings
    like SmolLM2's) and its tokenizer, both written by ``save_pretrained``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-lm")
    tokenizer = _tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng():   # HF initialises from the global RNG; seed it without disturbing other tests
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _conversations(n: int = 36, seed: int = 0) -> list[list[dict]]:
    """``n`` short deterministic conversations; every sixth starts with a system message."""
    rng = random.Random(seed)
    convs = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        msgs = [{"role": "system", "content": "You are a friendly chat partner."}] if i % 6 == 0 else []
        for turn in range(rng.randint(1, 3)):
            msgs.append({"role": "user", "content": f"Conversation {i}, turn {turn}: what about {topic}?"})
            msgs.append({"role": "assistant", "content": rng.choice(REPLIES)})
        convs.append(msgs)
    return convs


def _write_jsonl(path, convs) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for msgs in convs:
            f.write(json.dumps({"messages": msgs}) + "\n")


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory):
    """A .jsonl file of 36 short deterministic conversations, one ``{"messages": [...]}`` per line."""
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    _write_jsonl(path, _conversations())
    return path


@contextlib.contextmanager
def _single_thread():
    """Tiny models: extra intra-op threads only add overhead, and on a shared CPU they spin against other jobs."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture
def one_thread():
    with _single_thread():
        yield


@pytest.fixture(scope="module")
def one_thread_module():
    with _single_thread():
        yield


@pytest.fixture(scope="module")
def tiny_assets(tiny_lm_dir, chat_jsonl):
    """``(frozen tiny base model, packed data)`` as a sweep would load them: 32-token chunks, 16 train, 4 eval."""
    from loralab.lab.config.schema import DataConfig, ModelConfig
    from loralab.lab.run.data import load_data
    from loralab.lab.run.models import load_model

    model, tokenizer = load_model(ModelConfig(name=str(tiny_lm_dir)), "cpu")
    model.requires_grad_(False)
    data = load_data(DataConfig(source=str(chat_jsonl), seq_len=32, max_train_chunks=16, max_eval_chunks=4), tokenizer)
    return model, data


@pytest.fixture
def deadline():
    """``deadline(seconds)``: past it the test fails with ``TimeoutError`` instead of hanging (SIGALRM, POSIX only).
    Python's regex engine checks for signals while it backtracks, so a catastrophic match is interrupted too."""
    import signal

    def expired(signum, frame):
        raise TimeoutError("still running at the test's deadline: it would hang")

    def arm(seconds: float) -> None:
        signal.signal(signal.SIGALRM, expired)
        signal.setitimer(signal.ITIMER_REAL, seconds)

    yield arm
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
