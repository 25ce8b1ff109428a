"""The logs people use: Weights & Biases (offline), the PyTorch profiler, a final test-split
evaluation and a greedy sample at the end; the flags that need CUDA or wandb say so in one
line."""

import json
import os

import pytest

from launch import TINY, read_metrics, run_pretrain
from megatron_ext.training.job import check_machine, parse_job


def _wandb_records(root):
    """(run id, the .wandb file's bytes) of the offline runs under ``root``, oldest first."""
    runs = sorted((d for d in os.listdir(root) if d.startswith("offline-run-")))
    out = []
    for d in runs:
        (name,) = [n for n in os.listdir(os.path.join(root, d)) if n.endswith(".wandb")]
        out.append((name[len("run-"):-len(".wandb")],
                    open(os.path.join(root, d, name), "rb").read()))
    return out


def test_wandb_profiler_test_split_and_sample(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    ckpt, wandb_dir, out = tmp_path / "ckpt", tmp_path / "wb", tmp_path / "m.jsonl"
    flags = [*TINY, "--data-cache-path", str(tmp_path / "dc"), "--split", "80,10,10",
             "--eval-iters", "1", "--gns", "--save", str(ckpt), "--log-json", str(out),
             "--wandb-project", "megatron-ext-test", "--wandb-exp-name", "obs",
             "--wandb-save-dir", str(wandb_dir), "--nvtx-ranges"]
    ending = ["--sample-prompt", "def main(", "--sample-length", "8"]
    proc = run_pretrain(2, [*flags, "--train-iters", "4", "--exit-interval", "2", "--profile",
                            "--profile-step-start", "2", "--profile-step-end", "2",
                            "--profile-ranks", "0", "1", *ending], tmp_path)
    # the profiler: one trace per profiled rank, with events
    traces = sorted((tmp_path / "profile").glob("*.pt.trace.json"))
    assert [t.name.split(".")[0] for t in traces] == ["rank0", "rank1"]
    assert json.loads(traces[0].read_text())["traceEvents"]
    # stopped for a requeue: save and leave, no test split or sample (the scheduler may kill)
    assert " test loss at iteration" not in proc.stdout and "sample after" not in proc.stdout
    assert "test split and --sample-prompt skipped" in proc.stdout
    # W&B: the same scalars as TensorBoard, the GNS curves and the batch included
    (run_id, record), = _wandb_records(wandb_dir / "wandb")
    for key in (b"lm_loss", b"lr", b"global_batch_size", b"b_simple", b"gns/b_simple",
                b"gns/tokens", b"tokens_per_s", b"time/forward-backward"):
        assert key in record, key
    # a resumed run continues the same W&B run; completing the budget, it ends with the test
    # split, then a greedy sample
    proc = run_pretrain(2, [*flags, "--train-iters", "4", "--load", str(ckpt), *ending], tmp_path)
    ids = [rid for rid, _ in _wandb_records(wandb_dir / "wandb")]
    assert ids == [run_id, run_id]
    assert " test loss at iteration 4:" in proc.stdout
    assert any("test_lm_loss" in r for r in read_metrics(out))
    sample = [l for l in proc.stdout.splitlines() if l.startswith("> sample after iteration 4:")]
    assert len(sample) == 1 and "'def main(' -> '" in sample[0]


def test_flags_that_need_cuda_or_wandb_are_one_line(monkeypatch):
    job = parse_job(["--record-memory-history"], world_size=1)
    with pytest.raises(ValueError, match="--record-memory-history .* CUDA"):
        check_machine(job, cuda=False)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install 'megatron_ext\[logging\]'"):
        check_machine(parse_job(["--wandb-project", "p"], world_size=1), cuda=False)
    with pytest.raises(ValueError, match="--sample-prompt needs"):
        parse_job(["--sample-prompt", "x", "--pipeline-model-parallel-size", "2",
                   "--global-batch-size", "4"], world_size=2)
    with pytest.raises(ValueError, match="--profile-step-start"):
        parse_job(["--profile-step-start", "5", "--profile-step-end", "3"], world_size=1)
