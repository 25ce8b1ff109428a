"""Tests for tools/preprocess_data.py: ``--errors``, SIGINT/SIGTERM cleanup (with worker
processes too), a quiet stderr, outputs byte-identical to those of the code before these
changes and for any ``--workers``, progress lines, Parquet, and the benchmark's smoke mode.

The subprocess tests run the real script (megatron's import makes each take a few seconds).
"""
import glob
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_ext.data import ByteTokenizer
from megatron_ext.data.preprocess import (Interrupted, PreprocessError, stop_on_signals,
                                          _COMMITTING, main, preprocess)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "preprocess_data.py")
# sha256 of .bin/.idx that the code before --errors and signal handling wrote from the inputs
# of _write_valid_inputs: valid input must keep giving exactly these bytes.
PINNED = {
    "default": ("c9af6bd89e61855f4a8daaac0aebce0eafd065ed1f45bc088a4b556a55f553ed",
                "a7f20688d676077ea5ae17e79f277886bff50c88b136329136a9239a65f13c62"),
    "paragraphs": ("260c427bd1f7900ff4f4a48e53e36b77913bee09df3a6230d1b5fbd074685617",
                   "6511d9134ae91ca45bb8ca2635b54af94c28425af932e5f6301a64be313b9be8"),
}


def _write_valid_inputs(root):
    docs = ["hello", "wörld ∑ 🙂", "", "line one\r\nline two\n", "tab\tand \"quotes\"",
            "x" * 70000]
    (root / "a.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n"
                                          for i, d in enumerate(docs)) + "\n", encoding="utf-8")
    (root / "b.txt").write_text("para one\n\npara two ü\n \t\nthird\n", encoding="utf-8")
    (root / "c.md").write_text("# Title\n\nbody 中文\n", encoding="utf-8")


def _sha256(prefix):
    digests = []
    for suffix in (".bin", ".idx"):
        with open(prefix + suffix, "rb") as f:
            digests.append(hashlib.sha256(f.read()).hexdigest())
    return tuple(digests)


def _run_script(*args, **popen):
    return subprocess.Popen([sys.executable, SCRIPT, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def _outputs(directory, stem):
    return sorted(n for n in os.listdir(directory) if n.startswith(stem + "."))


# ---------------------------------------------------------------- valid input
def test_valid_input_is_byte_identical_and_stderr_quiet(tmp_path):
    (tmp_path / "in").mkdir()
    _write_valid_inputs(tmp_path / "in")
    prefix = str(tmp_path / "default")
    proc = _run_script("--input", str(tmp_path / "in"), "--output-prefix", prefix)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and err == ""  # no megatron import-time warnings
    assert out.splitlines() == [f"wrote 7 documents, 70114 tokens (1 empty skipped) from 3 "
                                f"file(s) to {prefix}.bin/.idx"]
    assert _sha256(prefix) == PINNED["default"]
    for errors in ("strict", "replace"):  # valid input: --errors changes nothing
        prefix = str(tmp_path / f"paragraphs_{errors}")
        preprocess([str(tmp_path / "in")], prefix, split_paragraphs=True, append_eod=False,
                   errors=errors)
        assert _sha256(prefix) == PINNED["paragraphs"]


# ---------------------------------------------------------------- --errors
@pytest.mark.parametrize("name,content,offset,line", [
    ("bad.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9 au lait"}\n', 28, 2),
    ("bad.txt", "naïve\r\n".encode() * 3 + b"\xff\xfe", 24, 4),
    ("cut.txt", "∑".encode()[:2], 0, 1),  # a sequence cut short by the end of the file
])
def test_strict_names_file_and_byte_offset(tmp_path, monkeypatch, capsys, name, content,
                                           offset, line):
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).write_bytes(content)
    (tmp_path / "good.txt").write_text("fine")
    assert main(["--input", "good.txt", name, "--output-prefix", "o"]) == 2  # strict: default
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == "" and "\n" not in err
    assert err.startswith(f"preprocess_data.py: error: {name}: not valid UTF-8 at byte offset "
                          f"{offset} (line {line}, byte 0x{content[offset]:02x}: ")
    assert err.endswith("pass --errors replace to store such bytes as U+FFFD")
    assert _outputs(tmp_path, "o") == []  # not even a temporary file


def test_replace_counts_bytes_per_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "x\xff\xfey"}\n{"text": "\xe2\x82!"}\n')
    (tmp_path / "b.txt").write_bytes(b"clean")
    (tmp_path / "c.txt").write_bytes(b"\x80tail")
    assert main(["--input", "a.jsonl", "b.txt", "c.txt", "--output-prefix", "o",
                 "--errors", "replace"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        "replaced 5 invalid UTF-8 byte(s) with U+FFFD", "  a.jsonl: 4 byte(s)",
        "  c.txt: 1 byte(s)"]
    # one U+FFFD per invalid sequence, as Python's errors="replace" decodes
    stats = preprocess(["a.jsonl"], "p", errors="replace", append_eod=False)
    assert stats.replaced == {"a.jsonl": 4}
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs = [ByteTokenizer().detokenize(d.tolist()) for d in IndexedDataset("p")]
    assert docs == ["x\ufffd\ufffdy", "\ufffd!"]
    # a single file: the total only
    assert main(["--input", "c.txt", "--output-prefix", "o", "--errors", "replace"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        "replaced 1 invalid UTF-8 byte(s) with U+FFFD"]


def test_bad_errors_value_and_unwritable_output(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(SystemExit) as exit_:
        main(["--input", "a.txt", "--output-prefix", "o", "--errors", "ignore"])
    assert exit_.value.code == 2 and "invalid choice: 'ignore'" in capsys.readouterr().err
    with pytest.raises(PreprocessError, match=r"--errors 'ignore': use one of \['strict'"):
        preprocess(["a.txt"], "o", errors="ignore")
    (tmp_path / "file").write_text("")  # a file where the output directory should be
    assert main(["--input", "a.txt", "--output-prefix", "file/sub/o"]) == 2
    assert capsys.readouterr().err == (f"preprocess_data.py: error: {tmp_path}/file/sub: "
                                       "Not a directory\n")


# ---------------------------------------------------------------- signals
def _big_input(path, docs=100_000):
    """~10 MB of JSONL: a second or more of work after megatron's import."""
    with open(path, "w") as f:
        for i in range(docs):
            f.write(json.dumps({"text": f"document {i} " + "lorem ipsum " * 7}) + "\n")


def _wait_for_partial_bin(directory, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        partial = glob.glob(os.path.join(directory, "out.tmp-*.bin"))
        if partial and os.path.getsize(partial[0]) > 0:  # tokens are being written
            return
        time.sleep(0.01)
    pytest.fail(f"no partial .bin appeared (exit status {proc.poll()})")


@pytest.mark.parametrize("sig,status,existing,workers", [(signal.SIGINT, 130, False, "1"),
                                                         (signal.SIGTERM, 143, True, "1"),
                                                         (signal.SIGTERM, 143, False, "2")])
def test_signal_removes_partial_output(tmp_path, sig, status, existing, workers):
    _big_input(tmp_path / "big.jsonl")
    if existing:  # a dataset from an earlier run must survive an interrupted rerun
        for suffix in (".bin", ".idx"):
            (tmp_path / f"out{suffix}").write_bytes(b"earlier " + suffix.encode())
    # As a foreground run: a shell starts background jobs (pytest too, if so run) with SIGINT
    # ignored, and the script rightly keeps it so.
    proc = _run_script("--input", str(tmp_path / "big.jsonl"), "--output-prefix",
                       str(tmp_path / "out"), "--workers", workers, "--progress-interval", "0",
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for_partial_bin(str(tmp_path), proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == status and out == ""
    assert err == (f"preprocess_data.py: stopped by {signal.Signals(sig).name}; removed the "
                   f"partial output ({tmp_path}/out.bin/.idx left as they were)\n")
    assert _outputs(tmp_path, "out") == (["out.bin", "out.idx"] if existing else [])
    if existing:
        assert (tmp_path / "out.bin").read_bytes() == b"earlier .bin"


def test_signal_handling_in_process():
    # pytest started as a background job (nohup ... &) inherits SIGINT ignored: start from
    # Python's default so the test does not depend on how it was launched.
    launched_with = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _signal_handling_in_process()
    finally:
        signal.signal(signal.SIGINT, launched_with)


def _signal_handling_in_process():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as stop:
        with stop_on_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this
    assert stop.value.signum == signal.SIGTERM and str(stop.value) == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before  # restored
    with stop_on_signals():  # once the outputs are being renamed, the run finishes
        _COMMITTING.set()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as for a shell's background job
    try:
        with stop_on_signals():
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------- workers, progress, formats
def _read_tokens(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return [d.tolist() for d in IndexedDataset(str(prefix))]


def test_any_number_of_workers_writes_the_same_bytes(tmp_path, monkeypatch):
    (tmp_path / "in").mkdir()
    _write_valid_inputs(tmp_path / "in")
    import megatron_ext.data.tokenize_pool as pool

    monkeypatch.setattr(pool, "CHUNK_DOCS", 2)  # many chunks in flight, out of order in time
    for workers in (2, 3):
        prefix = str(tmp_path / f"w{workers}")
        stats = preprocess([str(tmp_path / "in")], prefix, workers=workers)
        assert _sha256(prefix) == PINNED["default"] and stats.documents == 7
        preprocess([str(tmp_path / "in")], prefix, split_paragraphs=True, append_eod=False,
                   workers=workers)
        assert _sha256(prefix) == PINNED["paragraphs"]
    # a BPE tokenizer: the same ids from 1 and 2 workers, eod after each document
    from megatron_ext.data.tokenizer import TokenizerArgs
    from megatron_ext.data.tokenizer_training import stdlib_sources, train_byte_level_bpe

    files = stdlib_sources(300_000)
    bpe = train_byte_level_bpe(files[:3], str(tmp_path / "bpe"), 400)
    args = TokenizerArgs("GPT2BPETokenizer", vocab_file=bpe["vocab_file"],
                         merge_file=bpe["merge_file"])
    for workers in (1, 2):
        preprocess(files, str(tmp_path / f"bpe{workers}"), args, workers=workers)
    assert _sha256(str(tmp_path / "bpe1")) == _sha256(str(tmp_path / "bpe2"))
    docs = _read_tokens(tmp_path / "bpe2")
    assert len(docs) == len(files) and all(d[-1] == 0 and 0 not in d[:-1] for d in docs)


def test_progress_lines(tmp_path, capsys):
    import io

    from megatron_ext.data.progress import Progress, format_duration

    assert [format_duration(s) for s in (0.4, 59, 75, 3725)] == ["0s", "59s", "1m15s", "1h02m"]
    now = [100.0]
    out = io.StringIO()
    progress = Progress(10_000_000, 5, prefix="p: ", stream=out, clock=lambda: now[0])
    progress.add(10, 1_000_000)  # too early for a line
    now[0] = 110.0
    progress.add(10, 1_000_000)
    assert out.getvalue() == ("p: 20 docs, 2.0 MB in 10s: 2 docs/s, 0.20 MB/s, "
                              "ETA ~40s\n")
    assert "ETA" not in Progress(None, 5, clock=lambda: now[0]).line()  # size unknown
    # in a run: a line per finished chunk when the interval is tiny, on stderr only
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n"
                                              for i in range(3000)))
    preprocess([str(tmp_path / "a.jsonl")], str(tmp_path / "o"), progress_interval=1e-9)
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == "" and len(lines) == 3  # 1024 documents per chunk
    assert lines[-1].startswith("preprocess_data.py: 3,000 docs, 0.0 MB in ")
    assert "docs/s, " in lines[-1] and " MB/s, ETA ~" in lines[-1]


@pytest.mark.parametrize("flags,needle", [
    (["--workers", "0"], "--workers must be >= 1 (tokenizer processes), got 0"),
    (["--progress-interval", "-1"], "--progress-interval must be >= 0 seconds"),
    (["--tokenizer-type", "NullTokenizer", "--vocab-size", "9", "--workers", "2"],
     "cannot tokenize a document (ValueError: invalid literal for int()"),
    (["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", "missing.model"],
     "--tokenizer-model missing.model: no such local file or directory"),
])
def test_bad_flags_give_one_line(tmp_path, monkeypatch, capsys, flags, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("words, not ids")
    assert main(["--input", "a.txt", "--output-prefix", "o", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("preprocess_data.py: error: ") and needle in err
    assert err.count("\n") == 1 and _outputs(tmp_path, "o") == []


def test_megatron_lm_flag_spellings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "hi"}) + "\n")
    assert main(["--input", "a.jsonl", "--output-prefix", "o", "--json-keys", "body",
                 "--no-append-eod", "--workers", "2", "--tokenizer-type", "byte"]) == 0
    assert _read_tokens(tmp_path / "o") == [list(b"hi")]


def test_parquet_without_pyarrow_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    assert main(["--input", "d.parquet", "--output-prefix", "o"]) == 2
    assert capsys.readouterr().err == ("preprocess_data.py: error: d.parquet: reading Parquet "
                                       "needs the pyarrow package: pip install pyarrow\n")


def test_parquet_column(tmp_path, monkeypatch, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    monkeypatch.chdir(tmp_path)
    pq.write_table(pa.table({"body": ["one", None, "two ü"], "n": [1, 2, 3]}), "d.parquet")
    assert main(["--input", "d.parquet", "--output-prefix", "o", "--parquet-column",
                 "body"]) == 0
    assert _read_tokens(tmp_path / "o") == [list(b"one") + [256],
                                            list("two ü".encode()) + [256]]
    assert main(["--input", "d.parquet", "--output-prefix", "o"]) == 2
    assert "d.parquet: no column 'text' (found ['body', 'n']); set --parquet-column" in \
        capsys.readouterr().err
    assert main(["--input", "d.parquet", "--output-prefix", "o", "--parquet-column", "n"]) == 2
    assert "column 'n' holds int, not strings" in capsys.readouterr().err


def test_benchmark_quick_mode(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_preprocess.py"),
                           "--quick", "--out", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| workers | seconds | CPU seconds | MB/s | docs/s | speed-up |" in proc.stdout
    assert "outputs byte-identical across worker counts: yes" in proc.stdout
    result = json.loads(out.read_text())
    assert [r["workers"] for r in result["runs"]] == [1, 2] and result["identical"]


def test_token_dtype_agrees_with_megatron():
    from megatron.core.datasets.indexed_dataset import DType

    from megatron_ext.data.tokenize_pool import token_dtype

    for vocab in (None, 257, 65499, 65500, 128256):
        assert token_dtype(vocab) == DType.optimal_dtype(vocab), vocab
