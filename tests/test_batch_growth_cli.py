"""The simulator CLI runs and prints a plan table (subprocess, a fraction of a second)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(ROOT, "examples", "simulate_batch_growth.py")
TOPO = "nodes=8,gpus_per_node=8,nvlink_GBps=600,ib_Gbps=8x200,gpu=A100-80GB"


def run(*args):
    out = subprocess.run([sys.executable, CLI, *args], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_global_batch_path_table():
    out = run("--model", "gpt-1.3b", "--seq-length", "2048", "--topology", TOPO,
              "--global-batches", "256,512,1024,300", "--max-micro-batch-size", "4")
    lines = out.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.split()[:2] == ["global_batch", "mbs"])
    rows = [ln.split() for ln in lines[head + 1:head + 4]]
    assert [r[0] for r in rows] == ["256", "512", "1024"]
    assert [r[2] for r in rows] == ["1", "2", "4"] and rows[0][3] == "64"
    assert "invalid" in lines[head + 4]
    assert "8 node(s) x 8 a100-80gb" in out and "GiB" in out


def test_bnoise_path_grows():
    out = run("--model", "gpt-125m", "--topology", TOPO, "--bnoise-path", "200:2000",
              "--sim-steps", "3000", "--batch-growth", "gns", "--batch-growth-min-steps", "50")
    assert "rule=gns" in out and "gns: target" in out
    # max micro-batch from the memory planner, on the cost model's ModelShape
    assert "(megatron_ext.memory_planner)" in out
    final = int(out.strip().splitlines()[-1].split()[3])
    assert 1000 <= final <= 2000


def test_model_flags_build_the_cost_models_shape():
    from megatron_ext.cost_model import ModelShape

    out = run("--model", "gpt-1.3b", "--topology", TOPO, "--swiglu", "--num-query-groups", "4",
              "--disable-bias-linear", "--normalization", "RMSNorm", "--ffn-hidden-size", "5632",
              "--global-batches", "512")
    shape = ModelShape(24, 2048, 16, 2048, 50304, ffn_hidden_size=5632, num_query_groups=4,
                       swiglu=True, add_bias_linear=False, normalization="RMSNorm",
                       untie_embeddings=False)
    assert (f"{shape.num_params() / 1e9:.2f} B params, "
            f"{shape.flops_per_sample() / 1e12:.1f} TFLOP/sample") in out
    assert "groups=4" in out and "(megatron_ext.memory_planner)" in out
