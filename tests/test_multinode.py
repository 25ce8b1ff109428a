"""Two "nodes" on one machine: two torchrun agents (one process each) started by the SLURM
launcher from fake SLURM environments, meeting in a c10d rendezvous on 127.0.0.1.

Checks that both agents exit 0, the run reports world 2, its losses equal a one-agent
`--nproc_per_node 2` run of the same flags, and that topology detection in the workers of
this launch counts 2 nodes of 1 process.
"""

import json
import os
import signal
import subprocess
import sys

import pytest

from launch import SCRIPT, TINY, free_port, losses, run_pretrain
from megatron_ext.batch_growth.topology import detect

ITERS = ["--train-iters", "3"]

# detect() in each worker, with the torchrun variables it sees.
PROBE = """\
import json, os, sys
from megatron_ext.batch_growth.topology import detect
t = detect()
keys = ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE")
record = dict(nodes=t.num_nodes, gpus_per_node=t.gpus_per_node, source=t.source,
              env={k: os.environ.get(k) for k in keys})
with open(os.path.join(sys.argv[1], "rank%s.json" % os.environ["RANK"]), "w") as f:
    json.dump(record, f)
"""


def _node_env(node_id: int) -> dict:
    """This machine's environment as srun would set it on node `node_id` of a 2-node step."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.pop("TRITON_INTERPRET", None)  # training on CPU uses the PyTorch reference path
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(SLURM_JOB_ID="4242", SLURM_STEP_ID="0", SLURM_STEP_NODELIST="127.0.0.[1-2]",
               SLURM_STEP_NUM_NODES="2", SLURM_STEP_NUM_TASKS="2", SLURM_NODEID=str(node_id),
               SLURM_GPUS_ON_NODE="1")
    return env


def launch_two_nodes(script, args, workdir, timeout=120):
    """Run the launcher as srun would on two nodes; [(returncode, stdout, stderr)] per node."""
    cmd = [sys.executable, "-m", "megatron_ext.launch.slurm", "--port", str(free_port()), "--",
           str(script), *args]
    # Output to files, not pipes: an agent blocked on a full pipe would stall the other too.
    logs = [(workdir / f"{script.stem}.node{n}.out", workdir / f"{script.stem}.node{n}.err")
            for n in (0, 1)]
    procs = []
    try:
        for n, (out, err) in enumerate(logs):
            with open(out, "w") as o, open(err, "w") as e:
                procs.append(subprocess.Popen(cmd, cwd=workdir, env=_node_env(n), stdout=o,
                                              stderr=e))
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:  # torchrun passes SIGTERM on to its workers
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=30)
    return [(rc, out.read_text(), err.read_text()) for rc, (out, err) in zip(codes, logs)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("multinode")


@pytest.fixture(scope="module")
def two_nodes(workdir):
    args = [*TINY, *ITERS, "--data-cache-path", str(workdir / "dc"),
            "--log-json", str(workdir / "two_nodes.jsonl")]
    return launch_two_nodes(SCRIPT, args, workdir)


def test_both_agents_exit_0_with_world_2(two_nodes):
    for rc, out, err in two_nodes:
        assert rc == 0, f"agent failed ({rc}):\n{out[-3000:]}\n{err[-5000:]}"
    commands = [out.splitlines()[0] for _, out, _ in two_nodes]
    assert all("--nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:"
               in c for c in commands), commands
    startup = [ln for _, out, _ in two_nodes for ln in out.splitlines()
               if ln.startswith("> megatron_ext:")]
    assert len(startup) == 1 and "world 2 = TP 1 x PP 1 x CP 1 x DP 2" in startup[0], startup


def test_losses_equal_one_agent_run(two_nodes, workdir):
    run_pretrain(2, [*TINY, *ITERS, "--data-cache-path", str(workdir / "dc"),
                     "--log-json", str(workdir / "one_agent.jsonl")], workdir)
    multi, single = losses(workdir / "two_nodes.jsonl"), losses(workdir / "one_agent.jsonl")
    assert sorted(multi) == [1, 2, 3] and sorted(single) == [1, 2, 3]
    for it in single:
        assert multi[it] == pytest.approx(single[it], rel=1e-6), it


def test_workers_detect_two_nodes(workdir):
    probe, out_dir = workdir / "probe.py", workdir / "probe"
    probe.write_text(PROBE)
    out_dir.mkdir()
    results = launch_two_nodes(probe, [str(out_dir)], workdir)
    assert [rc for rc, _, _ in results] == [0, 0], results
    records = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rec in records:
        assert (rec["nodes"], rec["gpus_per_node"]) == (2, 1), rec
        assert rec["env"]["LOCAL_WORLD_SIZE"] == "1" and rec["env"]["WORLD_SIZE"] == "2"
        assert rec["env"]["GROUP_WORLD_SIZE"] == "2"
    assert sorted(rec["env"]["GROUP_RANK"] for rec in records) == ["0", "1"]


@pytest.mark.parametrize("local, world, nodes", [("1", "2", 2), ("2", "2", 1), ("8", "32", 4)])
def test_detect_counts_nodes_from_torchrun_env(tmp_path, local, world, nodes):
    env = {"LOCAL_WORLD_SIZE": local, "WORLD_SIZE": world, "SLURM_JOB_NUM_NODES": "7"}
    topo = detect(env=env, run=lambda cmd: None, sys_root=str(tmp_path))
    assert (topo.num_nodes, topo.gpus_per_node) == (nodes, int(local))
