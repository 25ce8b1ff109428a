"""What a cluster does to a run, on 2 CPU ranks: preemption signals to the torchrun agent,
one rank or all ranks; requeue with auto-resume; a second run into the same --save; wall
clock limits; resuming a finished run; damaged checkpoints; a full disk; a resumed
--log-json. Every case ends in one line and loses at most the steps since the last
complete checkpoint."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from launch import SCRIPT, TINY, free_port, losses, read_metrics, run_pretrain

BIG = ["--train-iters", "100000"]  # a run that only stops when told to


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def _start(tmp_path, data_cache, args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), str(SCRIPT), *TINY, "--data-cache-path",
           str(data_cache), *args]
    return subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait(predicate, what, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _logged(path):
    return len([r for r in read_metrics(path) if "lm_loss" in r]) if path.exists() else 0


def _status(save):
    return subprocess.run([sys.executable, "-m", "megatron_ext.training.run_status", str(save)],
                          capture_output=True, text=True, env=_env())


def _errors(text):
    return [line for line in text.splitlines() if "pretrain_gpt.py: error:" in line]


def _train(tmp_path, data_cache, args, nproc=2, check=True):
    return run_pretrain(nproc, [*TINY, "--data-cache-path", str(data_cache), *args], tmp_path,
                        check=check)


@pytest.mark.parametrize("target", ["agent", "one_rank", "all_ranks", "one_rank_usr1"])
def test_stop_signal_after_a_periodic_save_saves_at_the_stop_step(tmp_path, data_cache, target):
    """scancel/Kubernetes signal the torchrun agent, which signals each worker's process
    group (megatron-core's checkpoint-writer helper included); SLURM's --signal sends
    SIGUSR1. The stop-save must be written, completely, and say "stopped"."""
    ckpt, out = tmp_path / "ckpt", tmp_path / "out.jsonl"
    proc = _start(tmp_path, data_cache, [*BIG, "--save", str(ckpt), "--save-interval", "3",
                                         "--log-json", str(out)])
    _wait(lambda: (ckpt / "iter_0000003").exists() and _logged(out) >= 5, "the first save")
    workers = [p for p in psutil.Process(proc.pid).children()
               if any(str(SCRIPT) in part for part in p.cmdline())]
    assert len(workers) == 2
    if target == "agent":
        proc.send_signal(signal.SIGTERM)
    elif target == "all_ranks":
        for w in workers:
            w.send_signal(signal.SIGTERM)
    else:
        workers[-1].send_signal(signal.SIGUSR1 if target.endswith("usr1") else signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    saved = max(losses(out))
    assert f"saved checkpoint at iteration {saved} " in stdout, stdout[-3000:]
    assert "stop requested" in stdout
    assert not [p for p in os.listdir(ckpt) if p.endswith(".tmp")]
    status = _status(ckpt)
    assert status.returncode == 3 and f"stopped at iteration {saved}" in status.stdout
    if target != "agent":
        return
    # the resume continues exactly like a run that was never stopped
    resumed = tmp_path / "resumed.jsonl"
    _train(tmp_path, data_cache, [*BIG, "--load", str(ckpt), "--exit-interval", str(saved + 2),
                                  "--log-json", str(resumed)])
    reference = tmp_path / "reference.jsonl"
    _train(tmp_path, data_cache, [*BIG, "--exit-interval", str(saved + 2), "--log-json",
                                  str(reference)])
    got, want = losses(resumed), losses(reference)
    assert sorted(got) == [saved + 1, saved + 2]
    for it in got:
        assert got[it] == pytest.approx(want[it], rel=1e-6)


def test_job_script_auto_resume_and_a_second_run_into_the_same_save(tmp_path, data_cache):
    ckpt = tmp_path / "ckpt"
    auto = ["--train-iters", "4", "--save", str(ckpt), "--load", str(ckpt)]
    first = _train(tmp_path, data_cache, [*auto, "--exit-interval", "2", "--log-json",
                                          str(tmp_path / "a.jsonl")])
    assert "no checkpoint yet, starting fresh" in first.stdout
    assert _status(ckpt).returncode == 3
    second = _train(tmp_path, data_cache, [*auto, "--log-json", str(tmp_path / "a.jsonl")])
    assert "resumed from" in second.stdout and _status(ckpt).returncode == 0
    reference = tmp_path / "ref.jsonl"
    _train(tmp_path, data_cache, ["--train-iters", "4", "--log-json", str(reference)])
    got, want = losses(tmp_path / "a.jsonl"), losses(reference)
    assert sorted(got) == [1, 2, 3, 4]
    for it in got:
        assert got[it] == pytest.approx(want[it], rel=1e-6)
    # a fresh run (no --load) into a directory of another run refuses, and leaves it alone
    fresh = _train(tmp_path, data_cache, ["--train-iters", "4", "--save", str(ckpt)],
                   check=False)
    assert fresh.returncode != 0 and len(_errors(fresh.stderr)) == 1
    assert "already holds checkpoints (iter_0000004)" in _errors(fresh.stderr)[0]
    assert sorted(os.listdir(ckpt / "iter_0000004")) == sorted(os.listdir(ckpt / "iter_0000004"))
    # two runs at once into one --save: the second refuses
    busy = tmp_path / "busy"
    running = _start(tmp_path, data_cache, [*BIG, "--save", str(busy), "--log-json",
                                            str(tmp_path / "busy.jsonl")])
    _wait(lambda: _logged(tmp_path / "busy.jsonl") >= 1, "the first run to train")
    other = _train(tmp_path, data_cache, [*BIG, "--save", str(busy), "--load", str(busy)],
                   check=False)
    running.send_signal(signal.SIGTERM)
    running.communicate(timeout=120)
    assert other.returncode != 0 and len(_errors(other.stderr)) == 1
    assert "is in use by another run (pid" in _errors(other.stderr)[0]


def test_exit_duration_and_resuming_a_finished_run(tmp_path, data_cache):
    ckpt = tmp_path / "ckpt"
    start = time.time()
    proc = _train(tmp_path, data_cache, [*BIG, "--save", str(ckpt), "--exit-duration-in-mins",
                                         "0.25"], nproc=1)
    assert time.time() - start < 15 + 10  # the limit, plus the launcher's own start/stop
    assert "--exit-duration-in-mins 0.25" in proc.stdout and _status(ckpt).returncode == 3
    done = _train(tmp_path, data_cache, ["--train-iters", "2", "--load", str(ckpt)], nproc=1)
    line = [l for l in done.stdout.splitlines() if "nothing to train" in l]
    assert len(line) == 1 and "completes --train-iters 2" in line[0]


def test_damaged_latest_checkpoint_resumes_from_the_previous_one(tmp_path, data_cache):
    ckpt, reference = tmp_path / "ckpt", tmp_path / "ref.jsonl"
    _train(tmp_path, data_cache, ["--train-iters", "6", "--save", str(ckpt), "--save-interval",
                                  "2", "--log-json", str(reference)])
    shard = next(p for p in (ckpt / "iter_0000006").iterdir() if p.suffix == ".distcp")
    os.truncate(shard, shard.stat().st_size // 2)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("")
    out = tmp_path / "resumed.jsonl"
    proc = _train(tmp_path, data_cache, ["--train-iters", "6", "--load", str(ckpt),
                                         "--log-json", str(out)])
    assert "iter_0000006 is damaged" in proc.stdout and "resuming from iter_0000004" in proc.stdout
    got, want = losses(out), losses(reference)
    assert sorted(got) == [5, 6]
    for it in got:
        assert got[it] == pytest.approx(want[it], rel=1e-6)
    # --load naming one iteration directory, and an empty --load (one line, once)
    one = _train(tmp_path, data_cache, ["--train-iters", "3", "--load",
                                        str(ckpt / "iter_0000002")])
    assert "resumed from" in one.stdout and "iter_0000002 at iteration 2" in one.stdout
    (tmp_path / "empty").mkdir()
    empty = _train(tmp_path, data_cache, ["--load", str(tmp_path / "empty")], check=False)
    assert len(_errors(empty.stderr)) == 1 and "no checkpoint" in _errors(empty.stderr)[0]


def _limit_file_size(limit):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.parametrize("policy", ["stop", "continue"])
def test_full_disk_during_a_save(tmp_path, data_cache, policy):
    """Writes beyond RLIMIT_FSIZE fail like a full disk (EFBIG): one line, the partial save
    removed; --save-failure continue trains on."""
    ckpt = tmp_path / "ckpt"
    _train(tmp_path, data_cache, ["--train-iters", "3"], nproc=1)  # data cache built first
    cmd = [sys.executable, str(SCRIPT), *TINY, "--data-cache-path", str(data_cache),
           "--train-iters", "3", "--save", str(ckpt), "--save-interval", "1",
           "--save-failure", policy]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=300, preexec_fn=_limit_file_size(256 * 1024))
    assert "Traceback" not in proc.stderr
    assert not [p for p in os.listdir(ckpt) if p.startswith("iter_")]  # nothing partial left
    if policy == "stop":
        assert proc.returncode == 1 and len(_errors(proc.stderr)) == 1, proc.stderr[-3000:]
        assert "saving iteration 1 to" in _errors(proc.stderr)[0]
        assert _status(ckpt).returncode == 1
    else:
        assert proc.returncode == 0 and proc.stdout.count("training continues") == 3


def test_keep_last_and_leftover_tmp_directories(tmp_path, data_cache):
    ckpt = tmp_path / "ckpt"
    (ckpt / "iter_0000009.tmp").mkdir(parents=True)
    proc = _train(tmp_path, data_cache, ["--train-iters", "4", "--save", str(ckpt),
                                         "--save-interval", "1", "--keep-last", "2"], nproc=1)
    assert "removed unfinished saves iter_0000009.tmp" in proc.stdout
    assert sorted(p for p in os.listdir(ckpt) if p.startswith("iter_")) == \
        ["iter_0000003", "iter_0000004"]


def test_log_json_of_a_resumed_run_has_each_iteration_once(tmp_path, data_cache):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out.jsonl"
    proc = _start(tmp_path, data_cache, [*BIG, "--save", str(ckpt), "--save-interval", "3",
                                         "--log-json", str(out)])
    _wait(lambda: (ckpt / "iter_0000003").exists() and _logged(out) >= 5, "steps past a save")
    agent = psutil.Process(proc.pid)  # the node dies: no stop-save
    for p in agent.children(recursive=True) + [agent]:
        p.kill()
    proc.communicate(timeout=60)
    last_saved = max(int(p.name[5:]) for p in ckpt.iterdir() if p.name.startswith("iter_")
                     and not p.name.endswith(".tmp"))
    _train(tmp_path, data_cache, [*BIG, "--load", str(ckpt), "--exit-interval",
                                  str(last_saved + 3), "--log-json", str(out)])
    iterations = [r["iteration"] for r in read_metrics(out) if "lm_loss" in r]
    assert iterations == list(range(1, last_saved + 4))


def test_bad_flags_print_one_line_once_under_torchrun(tmp_path, data_cache):
    for flags, name in ((["--adam-beta1", "1.5"], "--adam-beta1"),
                        (["--train-iters", "20", "--train-samples", "200"], "--train-samples"),
                        (["--global-batch-size", "0"], "--global-batch-size")):
        proc = _train(tmp_path, data_cache, flags, check=False)
        lines = _errors(proc.stderr)
        assert proc.returncode != 0 and len(lines) == 1 and name in lines[0], proc.stderr[-2000:]
