"""Tests for megatron_ext.data: tokenizer, preprocessing, default corpus, datasets, sampler.

CPU only, no torch.distributed; megatron's own IndexedDataset reads back what we write.
"""
import argparse
import json
import os
import threading

import numpy
import pytest
import torch

from megatron_ext.data import (ByteTokenizer, DataConfig, GlobalBatchSampler, add_data_args,
                               build_default_corpus, build_gpt_datasets, build_tokenizer,
                               collate_micro_batch)
from megatron_ext.data.default_corpus import corpus_fingerprint, list_stdlib_sources
from megatron_ext.data.preprocess import main as preprocess_main
from megatron_ext.data.preprocess import preprocess

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
def _run(samplers, schedule, mbs=2):
    seen = []
    for gbs in schedule:
        for s in samplers:
            micro = s.next_global_batch(gbs, mbs)
            assert len(micro) == gbs // (mbs * s.dp_size) and all(len(m) == mbs for m in micro)
            seen += [i for m in micro for i in m]
    return seen


def test_sampler_changing_batch_is_exact():
    samplers = [GlobalBatchSampler(1000, r, 2) for r in range(2)]
    seen = _run(samplers, [4, 4, 8, 16])
    assert sorted(seen) == list(range(32)) and len(seen) == len(set(seen))
    assert all(s.consumed_samples == 32 and s.steps == 4 for s in samplers)
    # rank 0 holds the first half of each global batch, contiguously
    assert GlobalBatchSampler(100, 0, 2, consumed_samples=32).next_global_batch(8, 2) == [[32, 33], [34, 35]]


def test_sampler_resume_equals_uninterrupted():
    schedule = [4, 8, 8, 16, 4]
    full = _run([GlobalBatchSampler(50, r, 2) for r in range(2)], schedule)
    first = [GlobalBatchSampler(50, r, 2) for r in range(2)]
    part = _run(first, schedule[:2])
    resumed = [GlobalBatchSampler(50, r, 2) for r in range(2)]
    for s, old in zip(resumed, first):
        s.load_state_dict(old.state_dict())
    assert part + _run(resumed, schedule[2:]) == full
    # a resume with another DP size continues the same global stream
    one = GlobalBatchSampler(50, 0, 1)
    one.load_state_dict(first[0].state_dict())
    assert one.next_global_batch(4, 2) == [[12, 13], [14, 15]]


def test_sampler_wrap_and_errors():
    s = GlobalBatchSampler(10, 1, 2)
    s.next_global_batch(8, 2)
    assert s.next_global_batch(8, 2) == [[12 % 10, 13 % 10], [14 % 10, 15 % 10]] and s.epoch == 1
    strict = GlobalBatchSampler(10, 0, 2, wrap_around=False)
    strict.next_global_batch(8, 2)
    with pytest.raises(RuntimeError, match="out of samples"):
        strict.next_global_batch(8, 2)
    with pytest.raises(ValueError, match="multiple of 4"):
        s.next_global_batch(6, 2)
    with pytest.raises(ValueError, match="dp_rank"):
        GlobalBatchSampler(10, 2, 2)
    with pytest.raises(ValueError, match="rebuild the dataset"):
        GlobalBatchSampler(11, 0, 2).load_state_dict(s.state_dict())


# ---------------------------------------------------------------- pre-tokenized data
def write_pretokenized(prefix, docs, dtype=numpy.uint16):
    """A Megatron indexed dataset of given id lists, written by megatron-core's own builder
    (what Megatron-LM's preprocess_data.py produces with any tokenizer)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_document(numpy.asarray(doc, dtype=numpy.int64), [len(doc)])
    builder.finalize(prefix + ".idx")


def test_null_tokenizer_reads_pretokenized_data(tmp_path):
    from megatron_ext.data.builder import max_token_id

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
