"""End-to-end training on CPU (gloo): parallel layouts, recompute and resume keep the loss.

Every run starts from the same full weights (init by parameter name) and sees the same
global batches, so TP=2+SP, PP=2 and DP=2 must reproduce the TP=1/DP=1 loss curve up to
floating-point reassociation, recompute must not change it at all, and resuming from a
checkpoint must continue exactly.
"""

import json
import math
import subprocess
import sys

import pytest
import torch

from launch import SCRIPT, TINY, losses, read_metrics, run_pretrain

ITERS = 6


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


def _train(tmp_path, data_cache, nproc, extra, name, iters=ITERS, with_stdout=False):
    out = tmp_path / f"{name}.jsonl"
    proc = run_pretrain(nproc, [*TINY, "--train-iters", str(iters), "--data-cache-path",
                                str(data_cache), "--log-json", str(out), *extra], tmp_path)
    return (losses(out), proc.stdout) if with_stdout else losses(out)


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory, data_cache):
    tmp = tmp_path_factory.mktemp("baseline")
    # Evaluation runs forward-only on its own sampler and must not change training.
    loss, stdout = _train(tmp, data_cache, 1, ["--eval-interval", "3", "--eval-iters", "1",
                                               "--tensorboard-dir", str(tmp / "tb")],
                          "baseline", with_stdout=True)
    return loss, stdout, tmp / "tb"


@pytest.fixture(scope="module")
def baseline(baseline_run):
    return baseline_run[0]


def test_logs_validation_and_tensorboard(baseline_run):
    _, stdout, tb = baseline_run
    assert stdout.count("validation loss at iteration") == 2
    assert "core attention: sdpa" in stdout
    assert any(p.name.startswith("events.out.tfevents") for p in tb.iterdir())


def _close(a, b, rtol):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=rtol), (k, a, b)


def test_loss_goes_down(baseline):
    assert baseline[ITERS] < baseline[1]


@pytest.mark.parametrize(
    "name,nproc,extra",
    [
        ("tp2_sp", 2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
        ("pp2", 2, ["--pipeline-model-parallel-size", "2"]),
        ("dp2", 2, []),
        ("cp2", 2, ["--context-parallel-size", "2"]),
        ("tp2_sp_pp2", 4, ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                           "--pipeline-model-parallel-size", "2"]),
        ("local_attention", 1, ["--attention-backend", "local"]),
    ],
)
def test_parallel_layouts_match_baseline(tmp_path, data_cache, baseline, name, nproc, extra):
    _close(_train(tmp_path, data_cache, nproc, extra, name), baseline, rtol=2e-5)


@pytest.mark.parametrize(
    "extra",
    [["--recompute-granularity", "full", "--recompute-method", "uniform"],
     ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "2"],
     ["--recompute-granularity", "selective"]],
    ids=["full-uniform", "full-block", "selective"],
)
def test_recompute_matches_baseline(tmp_path, data_cache, baseline, extra):
    _close(_train(tmp_path, data_cache, 1, extra, "recompute"), baseline, rtol=1e-6)


def test_resume_matches_uninterrupted(tmp_path, data_cache, baseline):
    ckpt = tmp_path / "ckpt"
    first = _train(tmp_path, data_cache, 2, ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                             "--save", str(ckpt), "--save-interval", "3",
                                             "--exit-interval", "3"], "first")
    assert sorted(first) == [1, 2, 3]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    second = _train(tmp_path, data_cache, 2, ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                              "--load", str(ckpt)], "second")
    assert sorted(second) == [4, 5, 6]
    _close({**first, **second}, baseline, rtol=2e-5)


def test_bad_flags_exit_with_one_line(tmp_path):
    """Plain `python pretrain_gpt.py` (torchrun adds its own report of a failed child)."""
    cases = [
        (["--global-batch-size", "5"], "--global-batch-size"),
        (["--sequence-parallel"], "--sequence-parallel"),
        (["--num-attention-heads", "3", "--tensor-model-parallel-size", "2"], "--num-attention-heads"),
        (["--data-path", str(tmp_path / "missing")], "--data-path"),
        (["--gns", "--gns-estimator", "data-parallel"], "--gns-estimator"),
        (["--save", str(tmp_path / "a_file" / "ckpt")], "--save"),
        (["--gns", "--batch-growth", "ramp", "--rampup-batch-size", "4", "4", "8",
          "--batch-growth-max", "8", "--lr-scaling", "adascale", "--train-iters", "5"],
         "give the budget as --train-samples"),
    ]
    (tmp_path / "a_file").write_text("not a directory")
    if not torch.cuda.is_available():
        cases += [(["--dp-reduction", "hierarchical"], "--dp-reduction"),
                  (["--bf16"], "--bf16"),
                  (["--attention-backend", "flash"], "--attention-backend")]
    # the script itself once, then every case through its main() in one process (one
    # megatron-core import instead of one per case)
    proc = subprocess.run([sys.executable, str(SCRIPT), *TINY, *cases[0][0]], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    results = [(proc.returncode, proc.stderr)] + _main_in_one_process(
        [[*TINY, *extra] for extra, _ in cases[1:]], tmp_path)
    for (extra, flag), (returncode, stderr) in zip(cases, results):
        assert returncode == 2, (extra, stderr[-2000:])
        err = [l for l in stderr.splitlines() if l.startswith("pretrain_gpt.py: error:")]
        assert err and flag in err[0], stderr[-2000:]
        assert "Traceback" not in stderr


_DRIVER = """
import contextlib, io, json, sys
sys.argv[0] = "pretrain_gpt.py"  # argparse's prog, as when the script runs
from megatron_ext.training import main
out = []
for argv in json.load(open(sys.argv[1])):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    out.append((rc, err.getvalue()))
print(json.dumps(out))
"""


def _main_in_one_process(argvs, tmp_path):
    """(return code, stderr) of ``main(argv)`` for each argv, in one fresh process."""
    spec = tmp_path / "argvs.json"
    spec.write_text(json.dumps(argvs))
    proc = subprocess.run([sys.executable, "-c", _DRIVER, str(spec)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [tuple(r) for r in json.loads(proc.stdout.splitlines()[-1])]


def test_divergence_stops_with_one_line_and_names_the_checkpoint(tmp_path):
    """NaN gradients (absurd LR): a clear error naming the iteration and the last checkpoint
    instead of megatron-core's stack trace from inside DDP."""
    ckpt = tmp_path / "ckpt"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *TINY, "--lr", "1e5", "--clip-grad", "0",
         "--train-iters", "20", "--save", str(ckpt), "--save-interval", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    err = [l for l in proc.stderr.splitlines() if l.startswith("pretrain_gpt.py: error:")]
    assert err and "non-finite gradients" in err[0] and "found NaN" in err[0], proc.stderr[-2000:]
    last = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert f"iteration {last + 1}:" in err[0] and f"iter_{last:07d}" in err[0]
    assert "Traceback" not in proc.stderr


def test_resume_into_another_model_names_the_flags(tmp_path):
    ckpt = tmp_path / "ckpt"
    base = [sys.executable, str(SCRIPT), *TINY, "--train-iters", "1"]
    subprocess.run(base + ["--save", str(ckpt)], cwd=tmp_path, check=True,
                   capture_output=True, text=True, timeout=120)
    proc = subprocess.run(base + ["--train-iters", "2", "--load", str(ckpt), "--hidden-size", "32",
                                  "--swiglu"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = [l for l in proc.stderr.splitlines() if l.startswith("pretrain_gpt.py: error:")]
    assert err and "--hidden-size 64 (this run: 32)" in err[0] and "--swiglu False" in err[0]
    assert "Traceback" not in proc.stderr


def test_sigterm_saves_checkpoint_and_resumes(tmp_path, data_cache):
    """torchrun forwards SIGTERM to the ranks; they agree on a step, save and exit."""
    import os
    import signal
    import time

    from launch import SCRIPT, free_port

    ckpt = tmp_path / "ckpt"
    out = tmp_path / "killed.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), str(SCRIPT), *TINY, "--train-iters", "100000",
           "--data-cache-path", str(data_cache), "--log-json", str(out), "--save", str(ckpt)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if out.exists() and len(out.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert "saved checkpoint at iteration" in stdout, stdout[-3000:]
    saved = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert saved >= 2
    assert max(losses(out)) == saved
    # The checkpoint resumes (same dataset size, so the same sample order).
    run_pretrain(2, [*TINY, "--train-iters", "100000", "--data-cache-path", str(data_cache),
                     "--log-json", str(out), "--load", str(ckpt),
                     "--exit-interval", str(saved + 1)], tmp_path)
    assert max(losses(out)) == saved + 1


def test_resume_under_another_parallel_layout(tmp_path, data_cache, baseline):
    """Saved with TP=2+SP on 2 ranks, resumed with PP=2: megatron-core reshards the model and
    the optimizer state, so the loss curve continues like the uninterrupted run."""
    ckpt = tmp_path / "ckpt"
    first = _train(tmp_path, data_cache, 2, ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                             "--save", str(ckpt), "--exit-interval", "3"], "first")
    second = _train(tmp_path, data_cache, 2, ["--pipeline-model-parallel-size", "2",
                                              "--load", str(ckpt)], "second")
    _close({**first, **second}, baseline, rtol=2e-5)


def test_trains_on_pretokenized_megatron_data(tmp_path):
    """Data tokenized elsewhere (e.g. Megatron-LM + BPE): --tokenizer-type NullTokenizer."""
    import numpy

    from data_helpers import write_pretokenized

    rng = numpy.random.default_rng(1)
    prefix = str(tmp_path / "bpe")
    write_pretokenized(prefix, [rng.integers(0, 3000, 40 + i).tolist() for i in range(60)])
    out = tmp_path / "m.jsonl"
    proc = run_pretrain(1, [*TINY, "--train-iters", "3", "--data-path", prefix,
                            "--tokenizer-type", "NullTokenizer", "--vocab-size", "3000",
                            "--log-json", str(out)], tmp_path)
    assert "NullTokenizer(vocab_size=3001, eod=3000)" in proc.stdout
    assert "vocab 3001 padded to 3072" in proc.stdout
    assert sorted(losses(out)) == [1, 2, 3]
    assert abs(losses(out)[1] - math.log(3001)) < 0.5  # starts near uniform over the vocab


def test_logged_tflops_of_a_swiglu_gqa_model_match_a_hand_count(tmp_path, data_cache):
    """TFLOP/s/GPU in the log = model FLOPs per sample x batch / step time / GPUs, with the
    FLOPs counted as Megatron-LM counts them (SwiGLU: 3 MLP GEMMs; GQA: narrower K/V;
    causal attention: half the scores)."""
    out = tmp_path / "m.jsonl"
    run_pretrain(1, [*TINY, "--train-iters", "2", "--swiglu", "--num-query-groups", "2",
                     "--disable-bias-linear", "--data-cache-path", str(data_cache),
                     "--log-json", str(out)], tmp_path)
    # L=4, h=64, 4 heads of 16, 2 K/V groups (kv=32), f=256, s=32, vocab 257 padded to 512
    per_token = (6 * 4 * 64 * (64 + 2 * 32)   # QKV projection
                 + 6 * 4 * 64 * 64            # output projection
                 + 6 * 4 * 64 * 32            # QK^T and PV, halved by the causal mask
                 + 6 * 4 * 64 * 256 * 3       # SwiGLU MLP: gate, up, down
                 + 6 * 64 * 512)              # logits
    assert per_token == 1_720_320
    for row in [r for r in read_metrics(out) if "lm_loss" in r]:
        expected = per_token * 32 * 4 / (row["iteration_time_ms"] / 1e3) / 1 / 1e12
        assert row["tflops_per_gpu"] == pytest.approx(expected, rel=1e-9)
