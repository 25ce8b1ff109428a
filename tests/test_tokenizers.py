"""Tokenizers by --tokenizer-type: round trips, vocab size and eod, and one-line errors for
missing files, hub names, missing libraries and misplaced flags.

The tokenizers are trained here on a few stdlib files (tests/data_helpers.py), so nothing is
downloaded.
"""
import argparse
import json
import os
import sys

import numpy
import pytest

from megatron_ext.data import DataConfig, TokenizerArgs, build_gpt_datasets, build_tokenizer
from megatron_ext.data.builder import add_tokenizer_args
from megatron_ext.data.preprocess import main as preprocess_main
from megatron_ext.data.preprocess import preprocess
from megatron_ext.data.tokenizer import TEXT_TOKENIZER_TYPES, TOKENIZER_TYPES

from data_helpers import tokenizer_flags, train_tokenizers, write_pretokenized

TEXT = "def f(x):\n    return x  # naïve ∑ 🙂\n\nclass A:\n\tpass\n"


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return train_tokenizers(tmp_path_factory.mktemp("tokenizers"))


def _args(flags):
    """TokenizerArgs from command-line flags, parsed by the generated tokenizer flags."""
    return TokenizerArgs.of(add_tokenizer_args(argparse.ArgumentParser()).parse_args(flags))


def _one_line(err):
    msg = str(err.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


# ---------------------------------------------------------------- every type
@pytest.mark.parametrize("kind", TEXT_TOKENIZER_TYPES)
def test_round_trip_vocab_and_eod(paths, kind):
    tok = build_tokenizer(_args(tokenizer_flags(kind, paths)))
    ids = tok.tokenize(TEXT)
    assert ids and all(isinstance(i, int) for i in ids)
    assert 0 <= min(ids) and max(ids) < tok.vocab_size and 0 <= tok.eod < tok.vocab_size
    assert tok.eos == tok.eod and tok.eod not in ids
    assert tok.detokenize(ids) == TEXT
    # eod and ids a model may sample from its padded vocabulary are dropped, as for bytes
    assert tok.detokenize(ids + [tok.eod, tok.vocab_size, tok.vocab_size + 7]) == TEXT
    assert tok.detokenize(numpy.array(ids)) == TEXT
    identity = json.loads(json.dumps(tok.unique_identifiers))
    assert identity["vocab_size"] == tok.vocab_size and identity["eod"] == tok.eod
    assert all(os.path.isabs(f) for f in identity["files"])
    assert repr(tok).startswith(f"{kind}(") and f"vocab_size={tok.vocab_size}" in repr(tok)
    assert not hasattr(tok, "pad")  # megatron then pads with -1, masked out of the loss


def test_vocab_sizes_and_eods_are_the_files(paths):
    sizes = {k: build_tokenizer(_args(tokenizer_flags(k, paths))) for k in TEXT_TOKENIZER_TYPES}
    # the same BPE, read as GPT-2 files, as an HF directory and as a bare tokenizer.json
    bare = build_tokenizer(TokenizerArgs("HuggingFaceTokenizer",
                                         tokenizer_model=paths["tokenizer_json"]))
    for tok in (sizes["GPT2BPETokenizer"], sizes["HuggingFaceTokenizer"], bare):
        assert (tok.vocab_size, tok.eod) == (600, 0)  # <|endoftext|> was trained first
        assert tok.tokenize(TEXT) == bare.tokenize(TEXT)
    assert (sizes["SentencePieceTokenizer"].vocab_size, sizes["SentencePieceTokenizer"].eod) \
        == (400, 2)  # SentencePiece's </s>
    # Megatron-LM's TikTokenizer: 1000 special ids first, </s> is id 2, then the 266 tokens
    assert (sizes["TikTokenizer"].vocab_size, sizes["TikTokenizer"].eod) == (1266, 2)
    flags = tokenizer_flags("TikTokenizer", paths)
    cut = build_tokenizer(_args(flags + ["--vocab-size", "1260", "--tiktoken-pattern", "v1"]))
    assert cut.vocab_size == 1260 and cut.detokenize(cut.tokenize(TEXT)) == TEXT
    with pytest.raises(ValueError, match="--vocab-size 0: "):  # 0 is not "the file's size"
        build_tokenizer(_args(flags + ["--vocab-size", "0"]))


def test_build_from_data_config_and_cache(paths, tmp_path):
    flags = tokenizer_flags("HuggingFaceTokenizer", paths)
    a, b = build_tokenizer(_args(flags)), build_tokenizer(_args(flags))
    assert a is b  # read once per process
    prefix = str(tmp_path / "d")
    write_pretokenized(prefix, [a.tokenize(TEXT) + [a.eod]] * 3)
    cfg = DataConfig(data_path=[prefix], tokenizer_type="HuggingFaceTokenizer",
                     tokenizer_model=paths["hf_dir"])
    assert build_tokenizer(cfg) is a and build_tokenizer(TokenizerArgs.of(cfg)) is a
    # megatron's GPTDataset takes it: real ids, no padding id to mask real tokens with
    train, _, _ = build_gpt_datasets(cfg, 16, 1, 4, 0, 0)
    sample = train[0]
    assert int(sample["tokens"].max()) < a.vocab_size and bool(sample["loss_mask"].all())
    # the legacy (type, vocab_size) form still builds the two tokenizers it can name
    assert build_tokenizer("byte").vocab_size == 257
    assert build_tokenizer("NullTokenizer", 10).vocab_size == 11
    assert set(TOKENIZER_TYPES) == {"byte", "NullTokenizer", *TEXT_TOKENIZER_TYPES}


# ---------------------------------------------------------------- errors: one line each
@pytest.mark.parametrize("kind,flags,needle", [
    ("HuggingFaceTokenizer", [], "needs --tokenizer-model PATH (a local tokenizer directory"),
    ("SentencePieceTokenizer", [], "needs --tokenizer-model PATH (a local SentencePiece"),
    ("TikTokenizer", [], "needs --tokenizer-model PATH (a local tiktoken vocabulary JSON"),
    ("GPT2BPETokenizer", ["--vocab-file", "v.json"], "needs --vocab-file VOCAB.json and "
                                                     "--merge-file"),
    ("HuggingFaceTokenizer", ["--tokenizer-model", "x", "--vocab-file", "v"],
     "--vocab-file is not used by --tokenizer-type HuggingFaceTokenizer; drop it"),
    ("GPT2BPETokenizer", ["--vocab-file", "v", "--merge-file", "m", "--tokenizer-model", "x"],
     "--tokenizer-model is not used by --tokenizer-type GPT2BPETokenizer"),
    ("SentencePieceTokenizer", ["--tokenizer-model", "x", "--vocab-size", "9"],
     "SentencePieceTokenizer takes its vocabulary from its files: drop --vocab-size"),
    ("byte", ["--tokenizer-model", "x"], "--tokenizer-model is not used by --tokenizer-type byte"),
    ("byte", ["--vocab-size", "9"], "--vocab-size is for --tokenizer-type NullTokenizer"),
    ("NullTokenizer", [], "needs --vocab-size N"),
])
def test_flag_errors(kind, flags, needle):
    with pytest.raises(ValueError) as err:
        build_tokenizer(_args(["--tokenizer-type", kind, *flags]))
    assert needle in _one_line(err)


@pytest.mark.parametrize("kind,flag", [("HuggingFaceTokenizer", "--tokenizer-model"),
                                       ("SentencePieceTokenizer", "--tokenizer-model"),
                                       ("TikTokenizer", "--tokenizer-model"),
                                       ("GPT2BPETokenizer", "--vocab-file"),
                                       ("GPT2BPETokenizer", "--merge-file")])
def test_missing_file_names_the_flag(paths, tmp_path, kind, flag):
    flags = tokenizer_flags(kind, paths)
    missing = str(tmp_path / "nope" / "tokenizer.model")
    flags[flags.index(flag) + 1] = missing
    with pytest.raises(ValueError) as err:
        build_tokenizer(_args(flags))
    assert _one_line(err) .startswith(f"{flag} {missing}: no such local file or directory; "
                                      "nothing is downloaded, so pass ")


@pytest.mark.parametrize("name", ["gpt2", "meta-llama/Llama-3.1-8B"])
def test_hub_names_are_refused_before_any_library_call(name, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # would fail if it were imported
    with pytest.raises(ValueError) as err:
        DataConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=name, mock_data=True)
    msg = _one_line(err)
    assert msg.startswith(f"--tokenizer-model {name}: no such local file or directory")
    assert f"looks like a hub name: download it once, e.g. `huggingface-cli download {name} " \
           "--local-dir DIR`" in msg


@pytest.mark.parametrize("kind,module", [("SentencePieceTokenizer", "sentencepiece"),
                                         ("TikTokenizer", "tiktoken"),
                                         ("HuggingFaceTokenizer", "transformers"),
                                         ("GPT2BPETokenizer", "tokenizers")])
def test_missing_library_names_the_extra(paths, monkeypatch, kind, module):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ValueError) as err:
        build_tokenizer(_args(tokenizer_flags(kind, paths)))
    assert _one_line(err) == (f"--tokenizer-type {kind} needs the {module} package: "
                              "pip install 'megatron_ext[tokenizers]'")


def test_unreadable_or_unfit_files(paths, tmp_path):
    def error(kind, **files):
        with pytest.raises(ValueError) as err:
            build_tokenizer(TokenizerArgs(kind, **files))
        return _one_line(err)

    sp, hf = paths["sp_model"], paths["hf_dir"]
    assert error("HuggingFaceTokenizer", tokenizer_model=sp).startswith(
        f"--tokenizer-model {sp}: cannot be read by --tokenizer-type HuggingFaceTokenizer (")
    assert "cannot be read by --tokenizer-type SentencePieceTokenizer" in error(
        "SentencePieceTokenizer", tokenizer_model=paths["tokenizer_json"])
    assert "expected a JSON list of {rank, token_bytes, token_str}" in error(
        "TikTokenizer", tokenizer_model=paths["tokenizer_json"])
    assert "cannot be read by --tokenizer-type GPT2BPETokenizer" in error(
        "GPT2BPETokenizer", vocab_file=paths["merge_file"], merge_file=paths["vocab_file"])
    tik = paths["tiktoken_json"]
    for size in (5000, 1000):
        assert "holds 266 tokens after 1000 special ids; use more than 1000 and at most 1266" \
            in error("TikTokenizer", tokenizer_model=tik, vocab_size=size)
    assert "--tiktoken-pattern 'v3': use one of ['v1', 'v2']" in error(
        "TikTokenizer", tokenizer_model=tik, tiktoken_pattern="v3")
    assert "--tiktoken-num-special-tokens must be >= 7" in error(
        "TikTokenizer", tokenizer_model=tik, tiktoken_num_special_tokens=3)
    renamed = tmp_path / "vocab.tiktoken"
    renamed.write_bytes(open(tik, "rb").read())
    assert "Megatron-LM's TikTokenizer reads a .json vocabulary" in error(
        "TikTokenizer", tokenizer_model=str(renamed))
    # no end-of-document token: GPT-2 files without <|endoftext|>, an HF dir without eos
    vocab = json.load(open(paths["vocab_file"]))
    del vocab["<|endoftext|>"]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    assert "no end-of-document token (<|endoftext|> is not in it)" in error(
        "GPT2BPETokenizer", vocab_file=str(tmp_path / "vocab.json"), merge_file=paths["merge_file"])
    no_eos = tmp_path / "no_eos"
    no_eos.mkdir()
    config = json.load(open(os.path.join(hf, "tokenizer_config.json")))
    config.pop("eos_token")
    (no_eos / "tokenizer_config.json").write_text(json.dumps(config))
    (no_eos / "tokenizer.json").write_bytes(open(os.path.join(hf, "tokenizer.json"), "rb").read())
    assert "set eos_token in tokenizer_config.json" in error("HuggingFaceTokenizer",
                                                             tokenizer_model=str(no_eos))


# ---------------------------------------------------------------- DataConfig and the CLI
def test_data_config_checks(paths, tmp_path):
    flags = {"tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": paths["sp_model"]}
    with pytest.raises(ValueError, match="reads data tokenized with it: give --data-path"):
        DataConfig(**flags)
    DataConfig(**flags, mock_data=True)
    sp = build_tokenizer(TokenizerArgs(**flags))
    good, bad = str(tmp_path / "good"), str(tmp_path / "bad")
    write_pretokenized(good, [sp.tokenize(TEXT) + [sp.eod]])
    write_pretokenized(bad, [[1, 2, sp.vocab_size]])  # e.g. made with another tokenizer
    DataConfig(data_path=[good], **flags)
    with pytest.raises(ValueError) as err:
        DataConfig(data_path=[bad], **flags)
    assert _one_line(err).startswith(
        f"--data-path {bad}: token id 400 does not fit the vocabulary of 400 "
        "(SentencePieceTokenizer); it was not made by tools/preprocess_data.py with this "
        "tokenizer")


def test_preprocess_cli_tokenizer_errors(paths, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text(TEXT)
    cases = [(["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "gpt2"],
              "--tokenizer-model gpt2: no such local file"),
             (["--tokenizer-type", "GPT2BPETokenizer"], "needs --vocab-file"),
             (["--tokenizer-type", "NullTokenizer", "--vocab-size", "9"],
              "cannot tokenize a document (ValueError: invalid literal for int()")]
    for flags, needle in cases:
        assert preprocess_main(["--input", "a.txt", "--output-prefix", "o", *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("preprocess_data.py: error: ") and needle in err
        assert err.count("\n") == 1 and not [p for p in os.listdir() if p.startswith("o.")]
    (tmp_path / "ids.txt").write_text("5 3 8")  # NullTokenizer: ids given as numbers
    preprocess(["ids.txt"], "n", tokenizer=TokenizerArgs("NullTokenizer", vocab_size=9))
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset("n")  # (keep it: its arrays view its memory map)
    assert dataset[0].tolist() == [5, 3, 8, 9]
