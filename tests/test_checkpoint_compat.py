"""A checkpoint written before the train state owned the progress (format 1, megatron_ext
f891bde) resumes with the same losses that release got when it resumed it."""

import json
import shutil
from pathlib import Path

import pytest

from launch import losses, run_pretrain

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint_format1"
# The flags the fixture was written and resumed with (weight decay 0: that release also
# decayed biases and norms, which Megatron-LM does not and this one no longer does).
FLAGS = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
         "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
         "--lr", "1e-3", "--lr-decay-style", "constant", "--log-interval", "1",
         "--eval-interval", "1000", "--seed", "7", "--weight-decay", "0", "--train-iters", "6"]


def test_format_1_checkpoint_resumes_with_the_same_losses(tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, ckpt)
    expected = json.loads((FIXTURE / "expected_resume.json").read_text())
    out = tmp_path / "resumed.jsonl"
    run_pretrain(1, [*FLAGS, "--data-cache-path", str(tmp_path / "dc"), "--load", str(ckpt),
                     "--no-load-optim", "--log-json", str(out)], tmp_path)
    got = losses(out)
    assert sorted(got) == [4, 5, 6]
    for it, loss in expected["losses"].items():
        assert got[int(it)] == pytest.approx(loss, rel=1e-6), (it, got, expected)
