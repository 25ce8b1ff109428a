"""The SLURM launcher (host lists, environment -> torchrun arguments, CLI) and the example
job script's requeue decision, with fake SLURM environments and fake srun/scontrol/python."""

import os
import signal
import subprocess
import sys
import time

import pytest

from launch import REPO, free_port
from megatron_ext.launch import (HostlistError, SlurmEnvError, default_port, expand_hostlist,
                                 slurm_node, torchrun_args)
from megatron_ext.launch.slurm import main

SBATCH = REPO / "examples" / "slurm" / "pretrain_gpt.sbatch"

# What srun gives the launcher on node 2 of a 4-node step with 8 GPUs per node.
STEP_ENV = {
    "SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "gpu[01-03,07]",
    "SLURM_STEP_NODELIST": "gpu[01-03,07]", "SLURM_STEP_NUM_NODES": "4", "SLURM_NNODES": "4",
    "SLURM_STEP_NUM_TASKS": "4", "SLURM_NODEID": "2", "SLURM_GPUS_ON_NODE": "8",
    "SLURM_RESTART_COUNT": "1",
}


def step_env(**changes):
    env = dict(STEP_ENV, **changes)
    return {k: v for k, v in env.items() if v is not None}


# ----------------------------------------------------------------------------- host lists
@pytest.mark.parametrize("text, hosts", [
    ("node7", ["node7"]),
    ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
    ("a[8-10]", ["a8", "a9", "a10"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("x[3],y[1-2]-ib", ["x3", "y1-ib", "y2-ib"]),
    ("10.0.0.[1-2]", ["10.0.0.1", "10.0.0.2"]),
])
def test_expand_hostlist(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("text, why", [
    ("", "empty host list"), ("gpu[01-03", "unmatched '['"), ("gpu01]", "unmatched ']'"),
    ("gpu[3-1]", "runs backwards"), ("gpu[a-b]", "bad range"), ("gpu[]", "bad range"),
    ("a,,b", "empty host name"), ("a[[1]]", "nested"),
])
def test_expand_hostlist_errors(text, why):
    with pytest.raises(HostlistError, match=why.replace("[", r"\[")):
        expand_hostlist(text)


# ----------------------------------------------------------------------------- environment
def test_step_environment():
    node = slurm_node(step_env())
    assert node.hosts == ("gpu01", "gpu02", "gpu03", "gpu07")
    assert (node.nnodes, node.node_rank, node.nproc_per_node) == (4, 2, 8)
    assert node.nproc_source == "SLURM_GPUS_ON_NODE" and node.rdzv_id == "123456-1"
    assert torchrun_args(node, 23456) == [
        "--nnodes", "4", "--nproc-per-node", "8", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "gpu01:23456", "--rdzv-id", "123456-1", "--rdzv-conf", "is_host=0"]
    assert torchrun_args(slurm_node(step_env(SLURM_NODEID="0")), 1)[-2:] == [
        "--rdzv-conf", "is_host=1"]  # the first host serves the rendezvous
    assert torchrun_args(node, 23456, "static") == [
        "--nnodes", "4", "--nproc-per-node", "8", "--node-rank", "2",
        "--master-addr", "gpu01", "--master-port", "23456"]


def test_step_nodelist_wins_over_job_nodelist():
    # A step on 2 of the job's 4 nodes: the rendezvous host is the step's first node.
    env = step_env(SLURM_STEP_NODELIST="gpu[03,07]", SLURM_STEP_NUM_NODES="2",
                   SLURM_STEP_NUM_TASKS="2", SLURM_NODEID="1")
    node = slurm_node(env)
    assert node.hosts == ("gpu03", "gpu07") and node.node_rank == 1


@pytest.mark.parametrize("changes, nproc, source", [
    (dict(SLURM_GPUS_ON_NODE=None, CUDA_VISIBLE_DEVICES="0,1,2,3"), 4, "CUDA_VISIBLE_DEVICES"),
    (dict(SLURM_GPUS_ON_NODE="0", CUDA_VISIBLE_DEVICES="1,3"), 2, "CUDA_VISIBLE_DEVICES"),
    (dict(SLURM_GPUS_ON_NODE="8", CUDA_VISIBLE_DEVICES="0"), 8, "SLURM_GPUS_ON_NODE"),
])
def test_nproc_per_node_sources(changes, nproc, source):
    node = slurm_node(step_env(**changes))
    assert (node.nproc_per_node, node.nproc_source) == (nproc, source)
    assert slurm_node(step_env(**changes), nproc_per_node=3).nproc_per_node == 3


def test_single_node_batch_shell_uses_tasks_per_node():
    env = {"SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "dgx1", "SLURM_NNODES": "1",
           "SLURM_NODEID": "0", "SLURM_NTASKS_PER_NODE": "8"}
    node = slurm_node(env)
    assert (node.nnodes, node.nproc_per_node, node.nproc_source) == (1, 8, "SLURM_NTASKS_PER_NODE")
    assert node.rdzv_id == "9-0"


@pytest.mark.parametrize("env, why", [
    ({}, "not inside a SLURM allocation"),
    (step_env(SLURM_STEP_NUM_NODES="3"), r"SLURM_STEP_NUM_NODES=3 but .* names 4 host"),
    (step_env(SLURM_STEP_NUM_TASKS="32"), "srun started 32 launchers on 4 node"),
    (step_env(SLURM_NODEID="4"), "SLURM_NODEID=4 is outside"),
    (step_env(SLURM_NODEID="x"), "SLURM_NODEID='x' is not a whole number"),
    (step_env(SLURM_NODEID=None), "SLURM_NODEID is unset in a 4-node step"),
    (step_env(SLURM_STEP_NODELIST="gpu[01-0"), r"SLURM_STEP_NODELIST: unmatched '\['"),
    (step_env(SLURM_STEP_NODELIST="a,a,b,c"), "names a host twice"),
    (step_env(SLURM_STEP_NODELIST=None, SLURM_JOB_NODELIST=None), "SLURM_JOB_NODELIST is unset"),
    (step_env(SLURM_STEP_ID=None), "batch shell of a 4-node job"),
    (step_env(SLURM_GPUS_ON_NODE=None, SLURM_NTASKS_PER_NODE="1"), "how many processes"),
])
def test_inconsistent_environment(env, why):
    with pytest.raises(SlurmEnvError, match=why):
        slurm_node(env)


def test_default_port_per_job():
    assert default_port("123456") == 23456 and default_port("42") == 20042
    assert all(20000 <= default_port(str(j)) < 30000 for j in (0, 9999, 10 ** 9 + 7))


# ----------------------------------------------------------------------------- CLI
def test_dry_run_prints_command_only(capsys):
    calls = []
    rc = main(["--dry-run", "--port", "6000", "--", "train.py", "--lr", "1e-4"], env=step_env(),
              execv=lambda *a: calls.append(a))
    out = capsys.readouterr().out.strip()
    assert rc == 0 and calls == []
    assert out == (f"{sys.executable} -m torch.distributed.run --nnodes 4 --nproc-per-node 8 "
                   "--rdzv-backend c10d --rdzv-endpoint gpu01:6000 --rdzv-id 123456-1 "
                   "--rdzv-conf is_host=0 train.py --lr 1e-4")


def test_launch_execs_torchrun_with_sigusr1_ignored(capsys):
    """torchrun's agent would die of SIGUSR1; the ignore survives exec into torchrun."""
    seen = []
    before = signal.getsignal(signal.SIGUSR1)
    try:
        rc = main(["--", "train.py"], env=step_env(),
                  execv=lambda path, argv: seen.append((path, argv,
                                                        signal.getsignal(signal.SIGUSR1))))
    finally:
        signal.signal(signal.SIGUSR1, before)
    (path, argv, disposition), = seen
    assert rc == 0 and path == sys.executable and argv[1:3] == ["-m", "torch.distributed.run"]
    assert disposition == signal.SIG_IGN
    assert capsys.readouterr().out.strip().endswith("--rdzv-conf is_host=0 train.py")


def test_cli_errors_are_one_line():
    proc = subprocess.run([sys.executable, "-m", "megatron_ext.launch.slurm", "--", "t.py"],
                          env={"PATH": os.environ["PATH"]}, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "python -m megatron_ext.launch.slurm: error: not inside a SLURM allocation "
        "(SLURM_JOB_ID is unset): submit with sbatch/salloc, or call torchrun directly"]
    with pytest.raises(SystemExit) as e:
        main(["train.py"], env=step_env())
    assert e.value.code == 2


# ----------------------------------------------------------------------------- sbatch
def test_sbatch_is_valid_bash_with_requeue_settings():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    directives = [ln.split()[1] for ln in SBATCH.read_text().splitlines()
                  if ln.startswith("#SBATCH")]
    assert {"--signal=USR1@120", "--requeue", "--open-mode=append"} <= set(directives)


STUBS = {
    "srun": 'echo "$@" > "$STUB_LOG/srun"; exit "${FAKE_SRUN_RC:-0}"',
    "scontrol": 'echo "$@" >> "$STUB_LOG/scontrol"',
    "python": ('[ "$1 $2" = "-m megatron_ext.training.run_status" ] || exit 99\n'
               'echo "run_status: fake $FAKE_STATUS"; exit "$FAKE_STATUS"'),
}


def run_sbatch(tmp_path, status, restarts=0, srun_rc=0):
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    for d in (bin_dir, log):
        d.mkdir(exist_ok=True)
    for name, body in STUBS.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    for f in log.iterdir():
        f.unlink()
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log),
           "FAKE_STATUS": str(status), "FAKE_SRUN_RC": str(srun_rc), "CKPT": "/ckpt/run1",
           "DATA": "/data/corpus", "SLURM_JOB_ID": "777", "SLURM_JOB_NODELIST": "gpu[01-04]",
           "SLURM_CPUS_PER_TASK": "64", "SLURM_RESTART_COUNT": str(restarts)}
    proc = subprocess.run(["bash", str(SBATCH)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=30)
    calls = {f.name: f.read_text().split() for f in log.iterdir()}
    return proc, calls


@pytest.mark.parametrize("status, srun_rc, rc, requeued", [
    (0, 0, 0, False),   # finished
    (3, 0, 0, True),    # stopped with a checkpoint: requeue
    (1, 0, 1, False),   # failed
    (1, 1, 1, False),
    (3, 1, 0, True),    # the status file decides, not srun's exit code
])
def test_sbatch_requeue_decision(tmp_path, status, srun_rc, rc, requeued):
    proc, calls = run_sbatch(tmp_path, status, srun_rc=srun_rc)
    assert proc.returncode == rc, proc.stdout + proc.stderr
    assert calls.get("scontrol") == (["requeue", "777"] if requeued else None)
    srun = calls["srun"]
    launcher = srun.index("megatron_ext.launch.slurm")
    assert srun[:launcher - 2] == ["--ntasks-per-node=1", "--cpus-per-task=64",
                                   "--kill-on-bad-exit=1"]
    assert srun[launcher + 1:launcher + 3] == ["--", "examples/pretrain_gpt.py"]
    assert srun[-4:] == ["--save", "/ckpt/run1", "--load", "/ckpt/run1"]


def test_sbatch_stops_requeueing_after_max_requeues(tmp_path):
    proc, calls = run_sbatch(tmp_path, 3, restarts=50)
    assert proc.returncode == 1 and "scontrol" not in calls
    assert "not requeueing: 50 requeues already" in proc.stdout


# ----------------------------------------------------------------------------- signals
WAIT_FOR_USR1 = """\
import os, signal, sys, time
got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
with open(sys.argv[1], "w") as f:
    f.write(str(os.getpid()))
deadline = time.time() + 60
while not got and time.time() < deadline:
    time.sleep(0.05)
print("worker got SIGUSR1" if got else "worker timed out", flush=True)
sys.exit(0 if got else 1)
"""


def _kill_orphan(pid: int) -> None:
    """The worker outlives a killed agent (torchrun starts it in its own session)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_sigusr1_reaches_worker_and_spares_torchrun(tmp_path):
    """SLURM signals every process of the step: torchrun's agent (the launcher after exec) must
    survive SIGUSR1, and the worker's own handler gets it and ends the run with exit 0."""
    script, pid_file = tmp_path / "wait_usr1.py", tmp_path / "worker.pid"
    script.write_text(WAIT_FOR_USR1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_JOB_ID="5", SLURM_STEP_ID="0", SLURM_STEP_NODELIST="127.0.0.1",
               SLURM_STEP_NUM_NODES="1", SLURM_STEP_NUM_TASKS="1", SLURM_NODEID="0")
    agent = subprocess.Popen(
        [sys.executable, "-m", "megatron_ext.launch.slurm", "--nproc-per-node", "1",
         "--port", str(free_port()), "--", str(script), str(pid_file)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
            time.sleep(0.05)
        agent.send_signal(signal.SIGUSR1)
        time.sleep(0.5)
        assert agent.poll() is None, "torchrun's agent died of SIGUSR1"
        os.kill(int(pid_file.read_text()), signal.SIGUSR1)
        out, _ = agent.communicate(timeout=60)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        if agent.returncode != 0 and pid_file.exists() and pid_file.read_text():
            _kill_orphan(int(pid_file.read_text()))
    assert agent.returncode == 0 and "worker got SIGUSR1" in out, out[-3000:]
