"""--dp-reduction: flat vs hierarchical (distributed optimizer, one instance per node).

Two torchrun agents of 2 gloo processes each on this machine are 2 "nodes" (LOCAL_WORLD_SIZE
2, WORLD_SIZE 4): hierarchical then runs 2 optimizer instances of 2 ranks. Checks that the
losses and B_simple equal the flat run's, and that a hierarchical checkpoint resumes under
flat (the distributed optimizer's state is saved per parameter: any number of instances
loads it). The decision logic (auto, layout checks) is tested without processes.
"""
import os
import subprocess
import sys

import pytest

from launch import SCRIPT, free_port, read_metrics
from megatron_ext.training import dp_reduction
from megatron_ext.training.job import check_machine, parse_job

SMALL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
         "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
         "--make-vocab-size-divisible-by", "128", "--lr", "1e-3", "--lr-decay-style", "constant",
         "--log-interval", "1", "--eval-interval", "1000", "--seed", "7", "--gns",
         "--train-iters", "2"]


def launch_nodes(args, workdir, name, nnodes=2, nproc=2, timeout=240):
    """`nnodes` torchrun agents of `nproc` processes on this machine (static rendezvous)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.pop("TRITON_INTERPRET", None)  # training on CPU uses the PyTorch reference path
    env.setdefault("OMP_NUM_THREADS", "1")
    port = str(free_port())
    logs = [workdir / f"{name}.node{n}.log" for n in range(nnodes)]
    procs = []
    for n, log in enumerate(logs):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
               "--node-rank", str(n), "--nproc-per-node", str(nproc), "--master-addr",
               "127.0.0.1", "--master-port", port, str(SCRIPT), *args,
               "--log-json", str(workdir / f"{name}.jsonl")]
        with open(log, "w") as out:  # files, not pipes: a full pipe would stall an agent
            procs.append(subprocess.Popen(cmd, cwd=workdir, env=env, stdout=out,
                                          stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    text = logs[0].read_text()
    assert codes == [0] * nnodes, f"{name} failed {codes}:\n{text[-6000:]}"
    metrics = {m["iteration"]: m for m in read_metrics(workdir / f"{name}.jsonl")
               if "lm_loss" in m}
    return text, metrics


def _same(a, b, keys=("lm_loss", "b_simple")):
    for it in b:
        for key in keys:
            if key in a[it] or key in b[it]:
                assert b[it][key] == pytest.approx(a[it][key], rel=1e-6), (it, key)


def test_hierarchical_matches_flat_and_checkpoints_resume_across(tmp_path):
    pytest.importorskip("einops", reason="megatron-core builds the instance groups with einops "
                                         "(pip install -e . installs it)")
    cache = ["--data-cache-path", str(tmp_path / "dc")]
    hier_dir = tmp_path / "hier"
    out, flat = launch_nodes([*SMALL, *cache, "--dp-reduction", "flat"], tmp_path, "flat")
    assert "dp reduction" not in out  # the default says nothing
    assert sorted(flat) == [1, 2]
    out, hier = launch_nodes([*SMALL, *cache, "--dp-reduction", "hierarchical", "--save",
                              str(hier_dir), "--save-interval", "1"], tmp_path, "hier")
    assert "dp reduction: hierarchical" in out and "2 instance(s) of 2 data-parallel" in out
    _same(flat, hier)
    # hierarchical checkpoint (2 optimizer instances) -> flat reduce-scatter (1 instance)
    _, back = launch_nodes([*SMALL, *cache, "--dp-reduction", "flat",
                            "--use-distributed-optimizer", "--load",
                            str(hier_dir / "iter_0000001")], tmp_path, "back")
    assert sorted(back) == [2]
    _same(flat, back)


# ----------------------------------------------------------------------- decision logic
def _job(argv, world):
    return parse_job(argv, world_size=world)


def test_auto_is_flat_on_one_node():
    choice = dp_reduction.choose(_job(["--dp-reduction", "auto"], 4), per_node=4,
                                 predict=lambda job, n: pytest.fail("no prediction needed"))
    assert (choice.kind, choice.instances) == ("flat", 1) and "one node" in choice.note


@pytest.mark.parametrize("times, kind", [({"flat": 0.004, "hierarchical": 0.002}, "hierarchical"),
                                         ({"flat": 0.002, "hierarchical": 0.004}, "flat")])
def test_auto_follows_the_planner_and_prints_both_times(times, kind, monkeypatch):
    monkeypatch.setattr(dp_reduction, "_have_einops", lambda: True)
    job = _job(["--dp-reduction", "auto", "--tensor-model-parallel-size", "2"], 16)
    choice = dp_reduction.choose(job, per_node=4, predict=lambda j, n: times)
    assert choice.kind == kind
    assert "flat 4.00 ms" in choice.note or "flat 2.00 ms" in choice.note
    assert "hierarchical" in choice.note.split("auto:")[1]
    if kind == "hierarchical":  # 16 ranks / TP 2 = DP 8 over 4 nodes of 2 DP ranks
        assert choice.instances == 4 and choice.distributed_optimizer


def test_auto_planner_adapter_runs_on_the_real_planner():
    job = _job(["--dp-reduction", "auto", "--batch-growth", "ramp", "--rampup-batch-size",
                "4", "4", "64", "--batch-growth-max", "16", "--topology",
                "nodes=2,gpus_per_node=2,gpu=a100-80gb"], 4)
    times = dp_reduction.predicted_reduction_times(job, 2)
    assert set(times) == {"flat", "hierarchical"} and all(t > 0 for t in times.values())


def test_bad_layouts_are_one_line():
    with pytest.raises(ValueError, match="--dp-reduction"):
        _job(["--dp-reduction", "hierarchical"], 1)  # no data parallelism
    job = _job(["--dp-reduction", "hierarchical"], 4)
    assert dp_reduction.node_layout_problem(job, 4) is None  # one node: one instance
    assert "LOCAL_WORLD_SIZE" in dp_reduction.node_layout_problem(job, 3)


def test_machine_check_names_the_flag(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="--dp-reduction hierarchical"):
        check_machine(_job(["--dp-reduction", "hierarchical"], 4), cuda=False)


def test_cpu_backend_names_cpu_tensors_cuda_only_inside_the_wrapped_method():
    import torch

    from megatron_ext import cpu_backend

    seen = []
    wrapped = cpu_backend._cuda_type_names(lambda cls: seen.append(torch.zeros(1).type()))
    wrapped.__func__(None)
    assert seen == ["torch.cuda.FloatTensor"] and torch.zeros(1).type() == "torch.FloatTensor"
    assert torch.zeros(1).type(torch.float64).dtype == torch.float64
