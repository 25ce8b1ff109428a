"""Tests for tools/preprocess_data.py under bad input and signals: ``--errors``, SIGINT/SIGTERM
cleanup, a quiet stderr, and outputs byte-identical to those of the code before these changes.

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
from megatron_ext.data.preprocess import (Interrupted, PreprocessError, _stop_on_signals,
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


@pytest.mark.parametrize("sig,status,existing", [(signal.SIGINT, 130, False),
                                                 (signal.SIGTERM, 143, True)])
def test_signal_removes_partial_output(tmp_path, sig, status, existing):
    _big_input(tmp_path / "big.jsonl")
    if existing:  # a dataset from an earlier run must survive an interrupted rerun
        for suffix in (".bin", ".idx"):
            (tmp_path / f"out{suffix}").write_bytes(b"earlier " + suffix.encode())
    # As a foreground run: a shell starts background jobs (pytest too, if so run) with SIGINT
    # ignored, and the script rightly keeps it so.
    proc = _run_script("--input", str(tmp_path / "big.jsonl"), "--output-prefix",
                       str(tmp_path / "out"),
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
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as stop:
        with _stop_on_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this
    assert stop.value.signum == signal.SIGTERM and str(stop.value) == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before  # restored
    with _stop_on_signals():  # once the outputs are being renamed, the run finishes
        _COMMITTING.set()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as for a shell's background job
    try:
        with _stop_on_signals():
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
