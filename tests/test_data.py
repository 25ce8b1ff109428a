"""Tests for megatron_ext.data: tokenizer, preprocessing, default corpus, datasets, sampler.

CPU only, no torch.distributed; megatron's own IndexedDataset reads back what we write.
"""
import argparse
import gc
import json
import os
import struct
import sys
import threading

import numpy
import pytest
import torch

from megatron_ext.data import (ByteTokenizer, DataConfig, GlobalBatchSampler, add_data_args,
                               build_default_corpus, build_gpt_datasets, build_tokenizer,
                               collate_micro_batch)
from megatron_ext.data.builder import parse_blend
from megatron_ext.data.default_corpus import corpus_fingerprint, list_stdlib_sources
from megatron_ext.data.indexed import max_token_id, num_sequences
from megatron_ext.data.preprocess import main as preprocess_main
from megatron_ext.data.preprocess import preprocess

from data_helpers import write_pretokenized  # noqa: F401  (test_training imports it from here)

EOD = ByteTokenizer.eod


# ---------------------------------------------------------------- tokenizer
def test_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "def f(x):\n    return x  # naïve ∑ 🙂"
    ids = tok.tokenize(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tok.detokenize(ids + [tok.eod, 300]) == text  # eod and model padding ids dropped
    assert tok.detokenize([0xFF, ord("a")]) == "\ufffda"  # invalid UTF-8 is replaced
    assert (tok.vocab_size, tok.eod, tok.eos) == (257, 256, 256)
    assert json.loads(json.dumps(tok.unique_identifiers))["vocab_size"] == 257
    assert tok.tokenize_bytes(b"ab").tolist() == [97, 98]
    assert len(tok.vocab) == 257 and tok.inv_vocab[256] == "<eod>"
    with pytest.raises(ValueError, match="--tokenizer-type"):
        build_tokenizer("gpt2")


# ---------------------------------------------------------------- preprocess
def _write_inputs(tmp_path):
    jl = tmp_path / "a.jsonl"
    jl.write_text(json.dumps({"text": "hello"}) + "\n\n" + json.dumps({"text": "wörld", "id": 2})
                  + "\n" + json.dumps({"text": ""}) + "\n", encoding="utf-8")
    txt = tmp_path / "b.txt"
    txt.write_text("para one\n\npara two\n", encoding="utf-8")
    return jl, txt


def _read_docs(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    assert ds.index.dtype == numpy.uint16
    return [ds[i].tolist() for i in range(len(ds))]


def test_preprocess_jsonl_and_txt(tmp_path, capsys):
    jl, txt = _write_inputs(tmp_path)
    prefix = tmp_path / "out" / "corpus"
    assert preprocess_main(["--input", str(jl), str(txt), "--output-prefix", str(prefix)]) == 0
    assert "wrote 3 documents" in capsys.readouterr().out
    enc = lambda s: list(s.encode("utf-8")) + [EOD]  # noqa: E731
    assert _read_docs(prefix) == [enc("hello"), enc("wörld"), enc("para one\n\npara two\n")]
    assert sorted(os.listdir(prefix.parent)) == ["corpus.bin", "corpus.idx"]  # no temp files left

    stats = preprocess([str(tmp_path / "*.txt")], str(prefix), split_paragraphs=True, append_eod=False)
    assert (stats.documents, stats.tokens) == (2, 16)
    assert _read_docs(prefix) == [list(b"para one"), list(b"para two")]
    # a directory input picks up both files, sorted
    assert preprocess([str(tmp_path)], str(tmp_path / "dir")).documents == 3


@pytest.mark.parametrize("content,inputs,needle", [
    (None, ["missing.jsonl"], "no such file"),
    (None, ["nothing_*.jsonl"], "matches no file"),
    ('{"body": "x"}\n', ["bad.jsonl"], "no key 'text'"),
    ('{"text": "x"\n', ["bad.jsonl"], "bad.jsonl:1: invalid JSON"),
])
def test_preprocess_errors(tmp_path, capsys, monkeypatch, content, inputs, needle):
    monkeypatch.chdir(tmp_path)
    if content is not None:
        (tmp_path / "bad.jsonl").write_text(content)
    assert preprocess_main(["--input", *inputs, "--output-prefix", "o"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err
    assert not [p for p in os.listdir(tmp_path) if p.startswith("o.")]  # nothing written


# ---------------------------------------------------------------- default corpus
def test_default_corpus_deterministic_and_idempotent(tmp_path):
    p1 = build_default_corpus(str(tmp_path / "c"), max_bytes=200_000)
    fp1 = corpus_fingerprint(p1)
    mtime = os.path.getmtime(p1 + ".bin")
    p2 = build_default_corpus(str(tmp_path / "c"), max_bytes=200_000)
    assert p1 == p2 and corpus_fingerprint(p2) == fp1 and os.path.getmtime(p2 + ".bin") == mtime
    p3 = build_default_corpus(str(tmp_path / "other"), max_bytes=200_000)
    assert corpus_fingerprint(p3) == fp1
    with open(p1 + ".bin", "rb") as a, open(p3 + ".bin", "rb") as b:
        assert a.read() == b.read()
    files = list_stdlib_sources(200_000)
    assert fp1["documents"] == len(files) > 0
    assert fp1["tokens"] == sum(size for _, size in files) + len(files)  # bytes + one eod each
    assert not any(part in ("test", "tests", "site-packages") for rel, _ in files
                   for part in rel.split("/"))
    docs = _read_docs(p1)
    assert docs[0][-1] == EOD and bytes(docs[0][:-1]).decode("utf-8")  # a real source file


def test_default_corpus_concurrent_calls(tmp_path):
    cache, results, errors = str(tmp_path / "c"), [], []

    def call():
        try:
            results.append(build_default_corpus(cache, max_bytes=100_000))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    names = sorted(os.listdir(cache))
    assert [n.rsplit(".", 1)[1] for n in names] == ["bin", "idx", "json", "lock"]
    assert len(_read_docs(results[0])) == corpus_fingerprint(results[0])["documents"]

    # rank-0-builds-then-barrier mode
    calls = []
    p0 = build_default_corpus(str(tmp_path / "b"), 50_000, is_rank_zero=True, barrier=lambda: calls.append(0))
    p1 = build_default_corpus(str(tmp_path / "b"), 50_000, is_rank_zero=False, barrier=lambda: calls.append(1))
    assert p0 == p1 and calls == [0, 1]
    with pytest.raises(RuntimeError, match="did not leave"):
        build_default_corpus(str(tmp_path / "none"), 50_000, is_rank_zero=False, barrier=lambda: None)


# ---------------------------------------------------------------- datasets
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two small indexed datasets of 40 documents each."""
    root = tmp_path_factory.mktemp("ds")
    prefixes = []
    for name, letter in (("a", "x"), ("b", "y")):
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": f"{letter}{i} " * (5 + i)}) + "\n" for i in range(40)))
        preprocess([str(path)], str(root / name))
        prefixes.append(str(root / name))
    return root, prefixes


def test_build_gpt_datasets(corpus):
    root, (a, b) = corpus
    cfg = DataConfig(data_path=[a], split="80,10,10", data_cache_path=str(root / "cache"))
    train, valid, test = build_gpt_datasets(cfg, seq_length=32, seed=1, train_samples=100,
                                            valid_samples=10, test_samples=0)
    assert len(train) >= 100 and len(valid) >= 10 and test is None
    s = train[3]
    assert set(s) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert s["tokens"].shape == s["labels"].shape == (32,)
    assert torch.equal(s["tokens"][1:], s["labels"][:-1])  # labels are the next tokens
    assert int(s["tokens"].max()) <= EOD and torch.equal(s["position_ids"], torch.arange(32))
    batch = collate_micro_batch(train, [0, 5, 7])
    assert batch["tokens"].shape == (3, 32) and batch["loss_mask"].dtype == torch.float32
    assert torch.equal(batch["tokens"][1], train[5]["tokens"])
    # same seed -> same samples (from the cache now)
    again = build_gpt_datasets(cfg, 32, 1, 100, 10, 0)[0]
    assert torch.equal(again[17]["tokens"], train[17]["tokens"])

    blend = DataConfig(data_path=["0.75", a, "0.25", b], split="90,10,0")
    train, valid, _ = build_gpt_datasets(blend, 16, 2, 200, 20, 0)
    assert (len(train), len(valid)) == (200, 20)  # weighted blends have exact sizes
    texts = "".join(ByteTokenizer().detokenize(train[i]["tokens"].tolist()) for i in range(200))
    assert texts.count("x") > texts.count("y") > 0


def test_build_gpt_datasets_split_without_documents(corpus, caplog):
    _, (a, _) = corpus
    with pytest.raises(ValueError, match="train split 0 of the 40 documents"):
        build_gpt_datasets(DataConfig(data_path=[a], split="0,1,0"), 16, 1, 10, 0, 0)
    # 40 docs x 0.1% -> no test document: warn and return None instead of hanging in megatron
    train, valid, test = build_gpt_datasets(DataConfig(data_path=[a]), 16, 1, 10, 4, 4)
    assert train is not None and valid is not None and test is None
    assert "no test dataset" in caplog.text


def test_data_config_validation_and_flags(corpus, tmp_path):
    _, (a, _) = corpus
    with pytest.raises(ValueError, match=r"--data-path .*missing file .*nope\.bin"):
        DataConfig(data_path=[str(tmp_path / "nope")])
    with pytest.raises(ValueError, match="without the .bin/.idx suffix"):
        DataConfig(data_path=[a + ".bin"])
    with pytest.raises(ValueError, match="exclude each other"):
        DataConfig(data_path=[a], mock_data=True)
    for bad in ({"split": "a,b"}, {"split": "0,0,0"}, {"split": "1,1,1,1"}, {"tokenizer_type": "gpt2"},
                {"eval_iters": -1}, {"eval_interval": 0}, {"default_corpus_mb": 0}):
        with pytest.raises(ValueError):
            DataConfig(**bad)
    with pytest.raises(ValueError, match="weights must be > 0"):
        DataConfig(data_path=["0", a, "1", a])
    parser = add_data_args(argparse.ArgumentParser())
    args = parser.parse_args(["--data-path", "1", a, "2", a, "--split", "9,1,0", "--eval-iters", "3"])
    cfg = DataConfig.from_args(args)
    assert cfg.data_path == ["1", a, "2", a] and cfg.split == "9,1,0" and cfg.eval_iters == 3
    assert DataConfig.from_args(parser.parse_args([])) == DataConfig()


def test_default_corpus_size_flag(tmp_path):
    parser = add_data_args(argparse.ArgumentParser())
    cfg = DataConfig.from_args(parser.parse_args(["--default-corpus-mb", "0.3",
                                                  "--data-cache-path", str(tmp_path)]))
    train, _, _ = build_gpt_datasets(cfg, 64, 0, 100, 0, 0)
    assert len(train) >= 100
    (built,) = [p for p in (tmp_path / "stdlib_corpus").iterdir() if p.suffix == ".bin"]
    tokens = built.stat().st_size // 2  # uint16 ids: bytes + one eod per file
    assert "_300000_" in built.name and 250_000 < tokens <= 301_000


def test_mock_data():
    train, valid, test = build_gpt_datasets(DataConfig(mock_data=True), 16, 0, 50, 0, 0)
    assert len(train) >= 50 and valid is None and test is None
    assert train[0]["tokens"].shape == (16,)


# ---------------------------------------------------------------- sampler
def _run(samplers, schedule, consumed=0, mbs=2):
    """Every rank's indices for the steps of ``schedule`` from ``consumed``; the caller's count
    (as the training loop's) is the only state. Returns (indices, consumed after)."""
    seen = []
    for gbs in schedule:
        for s in samplers:
            micro = s.micro_batches(consumed, gbs, mbs)
            assert len(micro) == s.num_micro_batches(gbs, mbs) == gbs // (mbs * s.dp_size)
            assert all(len(m) == mbs for m in micro)
            seen += [i for m in micro for i in m]
        consumed += gbs
    return seen, consumed


def test_sampler_changing_batch_is_exact():
    seen, consumed = _run([GlobalBatchSampler(1000, r, 2) for r in range(2)], [4, 4, 8, 16])
    assert consumed == 32 and sorted(seen) == list(range(32)) and len(seen) == len(set(seen))
    # rank 0 holds the first half of each global batch, contiguously, rank 1 the second
    assert GlobalBatchSampler(100, 0, 2).micro_batches(32, 8, 2) == [[32, 33], [34, 35]]
    assert GlobalBatchSampler(100, 1, 2).micro_batches(32, 8, 2) == [[36, 37], [38, 39]]


def test_sampler_resume_equals_uninterrupted():
    schedule = [4, 8, 8, 16, 4]
    full, _ = _run([GlobalBatchSampler(50, r, 2) for r in range(2)], schedule)
    part, consumed = _run([GlobalBatchSampler(50, r, 2) for r in range(2)], schedule[:2])
    rest, _ = _run([GlobalBatchSampler(50, r, 2) for r in range(2)], schedule[2:], consumed)
    assert part + rest == full
    # a resume with another DP size continues the same global stream
    assert GlobalBatchSampler(50, 0, 1).micro_batches(consumed, 4, 2) == [[12, 13], [14, 15]]
    part, consumed = _run([GlobalBatchSampler(1000, r, 2) for r in range(2)], [8, 8])
    rest, consumed = _run([GlobalBatchSampler(1000, r, 4) for r in range(4)], [16, 8], consumed)
    assert sorted(part + rest) == list(range(consumed)) == list(range(40))


def test_sampler_is_stateless():
    s = GlobalBatchSampler(10, 1, 2)
    assert s.micro_batches(8, 8, 2) == s.micro_batches(8, 8, 2) == [[2, 3], [4, 5]]  # 12..15 wrap
    assert (s.epoch(0), s.epoch(9), s.epoch(10), s.epoch(25)) == (0, 0, 1, 2)
    assert not hasattr(s, "state_dict") and not hasattr(s, "consumed_samples")
    with pytest.raises(AttributeError):
        s.dp_rank = 0  # frozen: the arguments are all there is


def test_sampler_errors():
    strict = GlobalBatchSampler(10, 0, 2, wrap_around=False)
    assert strict.micro_batches(2, 8, 2) == [[2, 3], [4, 5]]
    with pytest.raises(RuntimeError, match="out of samples"):
        strict.micro_batches(8, 8, 2)
    s = GlobalBatchSampler(10, 1, 2)
    with pytest.raises(ValueError, match="multiple of 4"):
        s.micro_batches(0, 6, 2)
    with pytest.raises(ValueError, match="consumed_samples must be >= 0"):
        s.micro_batches(-1, 8, 2)
    with pytest.raises(ValueError, match="batch sizes must be > 0"):
        s.num_micro_batches(8, 0)
    with pytest.raises(ValueError, match="dp_rank"):
        GlobalBatchSampler(10, 2, 2)
    with pytest.raises(ValueError, match="total_samples"):
        GlobalBatchSampler(0, 0, 1)


# ---------------------------------------------------------------- blends and index files
def test_parse_blend(corpus):
    _, (a, b) = corpus
    assert parse_blend([a, b]) == ([a, b], None)  # weighted by size
    assert parse_blend(["0.3", a, "0.7", b]) == ([a, b], [0.3, 0.7])
    assert parse_blend(["3", a]) == ([a], [3.0])
    for bad in (["0", a, "1", b], ["-0.5", a, "1", b], ["nan", a, "1", b], ["inf", a]):
        with pytest.raises(ValueError, match="blend weights must be > 0"):
            parse_blend(bad)
    with pytest.raises(ValueError, match="mixes weighted and unweighted"):
        parse_blend(["0.3", a, b, "0.7"])  # megatron would assert here
    with pytest.raises(ValueError, match="mixes weighted and unweighted"):
        DataConfig(data_path=["0.3", a, b, b])  # megatron would read 0.3 as a prefix here
    with pytest.raises(ValueError, match="at least one PREFIX"):
        parse_blend([])


def test_num_sequences_matches_preprocessing(tmp_path):
    jl, txt = _write_inputs(tmp_path)
    prefix = str(tmp_path / "c")
    stats = preprocess([str(jl), str(txt)], prefix, split_paragraphs=True)
    assert num_sequences(prefix) == stats.documents == len(_read_docs(prefix)) == 4
    write_pretokenized(str(tmp_path / "p"), [[1, 2]] * 7)
    assert num_sequences(str(tmp_path / "p")) == 7


def test_vocab_check_reads_first_million_tokens(tmp_path, monkeypatch):
    prefix = str(tmp_path / "big")
    write_pretokenized(prefix, [[0] * (1 << 20), [5000]])
    assert max_token_id(prefix) == 0 and max_token_id(prefix, (1 << 20) + 1) == 5000
    DataConfig(data_path=[prefix])  # the id past the first 1M is not looked at
    write_pretokenized(str(tmp_path / "none"), [])
    assert max_token_id(str(tmp_path / "none")) == -1
    # a blend of 100 prefixes opens at most ~64 of them for the check
    import megatron_ext.data.indexed as indexed

    opened = []
    monkeypatch.setattr(indexed, "max_token_id", lambda p: opened.append(p) or 0)
    DataConfig(data_path=[prefix] * 100)
    assert 32 <= len(opened) <= 64


def _bad_files(tmp_path):
    """(name, .idx bytes, .bin bytes, file the message starts with, words it must hold) of
    damaged or mismatched indexed datasets; good.idx: 2 uint16 sequences [1, 2, 3], [4, 5]."""
    good, other = str(tmp_path / "good"), str(tmp_path / "other")
    write_pretokenized(good, [[1, 2, 3], [4, 5]])
    write_pretokenized(other, [[1, 2], [3, 4, 5, 6]])  # same dtype and count, other lengths
    idx, data = _read(good + ".idx"), _read(good + ".bin")
    # Layout: 34-byte header (dtype code at byte 17), lengths @34, pointers @42, documents @58.
    mismatch = "is truncated or has extra bytes, or the .idx belongs to another dataset or dtype"
    return [
        ("empty_both", b"", b"", ".idx", "is empty"),
        ("empty_idx", b"", data, ".idx", "is empty"),
        ("empty_bin", idx, b"", ".bin", f"is 0 bytes but {tmp_path}/empty_bin.idx describes 10"),
        ("garbage", b"not an index at all", data, ".idx", "only 19 bytes"),
        ("no_magic", b"x" * 82, data, ".idx", "is not a Megatron index"),
        ("header_only", idx[:20], data, ".idx", "shorter than a Megatron index header"),
        ("version", idx[:9] + struct.pack("<Q", 2) + idx[17:], data, ".idx", "index version 2"),
        ("truncated_idx", idx[:-8], data, ".idx", "is 74 bytes but its header describes 82"),
        ("idx_extra_bytes", idx + b"\0" * 8, data, ".idx", "truncated or has extra bytes"),
        ("unknown_dtype", idx[:17] + b"\x63" + idx[18:], data, ".idx", "unknown dtype code 99"),
        ("other_dtype", idx[:17] + b"\x04" + idx[18:], data, ".bin", "(5 int32 tokens"),
        ("other_dataset", _read(other + ".idx"), data, ".bin", "describes 12 (6 uint16"),
        ("truncated_bin", idx, data[:4], ".bin", mismatch),
        ("bin_extra_bytes", idx, data + b"\0\0", ".bin", mismatch),
        ("bad_pointer", idx[:50] + struct.pack("<q", 0) + idx[58:], data, ".idx",
         "sequence pointers that do not match"),
        ("bad_documents", idx[:74] + struct.pack("<q", 1), data, ".idx",
         "document indices that do not run from 0 up to its 2 sequences"),
        ("negative_length", idx[:34] + struct.pack("<ii", 7, -2) + idx[42:], data, ".idx",
         "negative sequence length"),
    ]


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _write_pair(prefix, idx, data):
    for suffix, content in ((".idx", idx), (".bin", data)):
        with open(prefix + suffix, "wb") as f:
            f.write(content)


def _assert_one_clear_line(check, prefix, culprit, needle):
    with pytest.raises(ValueError) as err:
        check()
    msg = str(err.value)
    assert msg.startswith(f"--data-path {prefix}: {prefix}{culprit} ") and "\n" not in msg
    assert needle in msg and "tools/preprocess_data.py" in msg


def test_bad_index_files_give_one_clear_line(tmp_path, monkeypatch):
    unraisable = []  # megatron's __del__ on a half-built IndexedDataset would land here
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    for name, idx, data, culprit, needle in _bad_files(tmp_path):
        prefix = str(tmp_path / name)
        _write_pair(prefix, idx, data)
        _assert_one_clear_line(lambda: DataConfig(data_path=[prefix]), prefix, culprit, needle)
        _assert_one_clear_line(lambda: num_sequences(prefix), prefix, culprit, needle)
        _assert_one_clear_line(lambda: max_token_id(prefix), prefix, culprit, needle)
    gc.collect()
    assert not unraisable, [str(u.exc_value) for u in unraisable]


def test_every_shard_of_a_blend_is_checked(tmp_path):
    """The vocabulary check samples ~32 shards; the integrity check must see all of them."""
    prefixes = []
    for i in range(200):
        prefixes.append(str(tmp_path / f"shard{i:03d}"))
        write_pretokenized(prefixes[-1], [[i % 250] * (3 + i % 7), [7, 8]])
    DataConfig(data_path=prefixes)
    DataConfig(data_path=[x for p in prefixes for x in ("0.5", p)])
    bad = prefixes[151]  # not among the vocabulary check's samples (every 6th)
    with open(bad + ".bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match=f"^--data-path {bad}: {bad}.bin is 20 bytes but"):
        DataConfig(data_path=prefixes)


def test_index_checks_accept_what_megatron_writes(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_ext.data.indexed import check_indexed_dataset

    write_pretokenized(str(tmp_path / "empty"), [])  # no documents: consistent, 0 tokens
    info = check_indexed_dataset(str(tmp_path / "empty"))
    assert (info.sequences, info.tokens) == (0, 0)
    write_pretokenized(str(tmp_path / "wide"), [[70000, 1], [2]], dtype=numpy.int32)
    info = check_indexed_dataset(str(tmp_path / "wide"))
    assert (info.dtype, info.sequences, info.tokens) == (numpy.int32, 2, 3)
    assert max_token_id(str(tmp_path / "wide")) == 70000
    # multimodal indices carry one mode byte per sequence after the document indices
    builder = IndexedDatasetBuilder(str(tmp_path / "mm.bin"), numpy.uint16, multimodal=True)
    builder.add_document(numpy.array([1, 2, 3]), [3], modes=[0])
    builder.finalize(str(tmp_path / "mm.idx"))
    assert check_indexed_dataset(str(tmp_path / "mm")).tokens == 3


def test_unreadable_index_gives_one_clear_line(tmp_path, monkeypatch):
    prefix = str(tmp_path / "locked")
    write_pretokenized(prefix, [[1, 2]])
    real_open = open

    def deny(path, *args, **kwargs):  # chmod does not stop root, so refuse the open itself
        if str(path) == prefix + ".idx":
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", deny)
    with pytest.raises(ValueError, match=f"^--data-path {prefix}: cannot read {prefix}.idx "
                                         r"\(Permission denied\); rebuild"):
        DataConfig(data_path=[prefix])


# ---------------------------------------------------------------- pre-tokenized data
def test_null_tokenizer_reads_pretokenized_data(tmp_path):
    rng = numpy.random.default_rng(0)
    prefix = str(tmp_path / "bpe")
    write_pretokenized(prefix, [rng.integers(0, 1000, 50 + i).tolist() for i in range(30)])
    assert 900 < max_token_id(prefix) < 1000
    tok = build_tokenizer("NullTokenizer", 1000)
    assert (tok.vocab_size, tok.eod) == (1001, 1000) and tok.detokenize(tok.tokenize("3 7")) == "3 7"
    cfg = DataConfig(data_path=[prefix], tokenizer_type="NullTokenizer", vocab_size=1000)
    train, _, _ = build_gpt_datasets(cfg, 32, 1, 20, 0, 0)
    assert int(train[0]["tokens"].max()) <= 1000
    with pytest.raises(ValueError, match=r"token id 9\d\d does not fit the vocabulary of 501"):
        DataConfig(data_path=[prefix], tokenizer_type="NullTokenizer", vocab_size=500)
    with pytest.raises(ValueError, match="use --tokenizer-type NullTokenizer --vocab-size"):
        DataConfig(data_path=[prefix])  # byte tokenizer: ids must be < 257
    with pytest.raises(ValueError, match="needs --vocab-size"):
        DataConfig(data_path=[prefix], tokenizer_type="NullTokenizer")
    with pytest.raises(ValueError, match="give --data-path"):
        DataConfig(tokenizer_type="NullTokenizer", vocab_size=1000)
    with pytest.raises(ValueError, match="--vocab-size is for"):
        DataConfig(vocab_size=1000)
