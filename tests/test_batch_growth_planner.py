"""Tests of megatron_ext.batch_growth.planner (validity, pp constraint, reduction choice)."""
import math

import pytest

from megatron_ext.batch_growth import BatchPlanner, parse_topology
from megatron_ext.batch_growth.step_time import DEFAULT_OVERHEAD_TOKENS
from megatron_ext.cost_model import ModelShape

A100_64 = "nodes=8,gpus_per_node=8,nvlink_GBps=600,ib_Gbps=8x200,gpu=A100-80GB"
GPT_1_3B = ModelShape(num_layers=24, hidden_size=2048, num_attention_heads=16,
                      seq_length=2048, vocab_size=50304, untie_embeddings=False)


def gpt13b_planner(topo=A100_64, **kw):
    args = dict(dp_size=64, max_micro_batch_size=4, seq_length=2048)
    args.update(kw)
    return BatchPlanner(GPT_1_3B.flops_per_sample(), GPT_1_3B.num_params(),
                        parse_topology(topo), **args)


def test_planner_takes_the_cost_models_numbers():
    """The planner is model-agnostic: compute = FLOPs * B / (GPUs * peak * MFU), and the
    gradient bytes are the fp32 parameters of one tp*pp shard."""
    p = gpt13b_planner(mfu_assumed=0.5)
    l, h, s, v = 24, 2048, 2048, 50304
    assert p.model_flops_per_sample == pytest.approx(
        72 * s * l * h ** 2 * (1 + s / (12 * h) + v / (12 * l * h)))  # causal attention
    assert p.param_count == l * (12 * h * h + 13 * h) + v * h + 2 * h  # rope: no pos table
    plan = p.plan(512)                                   # 4 x 2 per rank
    gpus, peak = 64, parse_topology(A100_64).gpu_tflops * 1e12
    eff = 4 * 2048 / (4 * 2048 + DEFAULT_OVERHEAD_TOKENS)  # per-micro-batch efficiency
    assert plan.breakdown["compute_s"] == pytest.approx(
        GPT_1_3B.flops_per_sample() * 512 / (gpus * peak * 0.5 * eff))
    assert gpt13b_planner(dp_size=32, tp_size=2).grad_bytes() == pytest.approx(p.param_count * 2)


def test_plan_divisibility_and_largest_micro_batch():
    p = gpt13b_planner()
    plan = p.plan(512)
    assert (plan.micro_batch_size, plan.num_microbatches, plan.dp_size) == (4, 2, 64)
    assert plan.global_batch == plan.micro_batch_size * plan.num_microbatches * plan.dp_size
    assert p.plan(320).micro_batch_size == 1            # 5 per rank: only 1 divides
    assert p.plan(384).micro_batch_size == 3
    with pytest.raises(ValueError, match="multiple of dp"):
        p.plan(300)
    assert all(b % 64 == 0 for b in p.valid_global_batches(1, 1000))
    assert p.valid_global_batches(100, 300) == [128, 192, 256]
    assert plan.predicted_tokens_per_s == pytest.approx(plan.predicted_samples_per_s * 2048)


def test_pipeline_needs_enough_microbatches():
    p = gpt13b_planner(dp_size=8, pp_size=4, max_micro_batch_size=8)
    assert p.split_options(8 * 16) == [(4, 4), (2, 8), (1, 16)]  # 8 x 2 leaves m < pp
    plan = p.plan(8 * 16)  # more, smaller micro-batches shrink the bubble (pp-1)/m
    times = {o: p.predict_step_time(*o) for o in p.split_options(8 * 16)}
    assert (plan.micro_batch_size, plan.num_microbatches) == min(times, key=times.get)
    m = plan.num_microbatches
    assert plan.breakdown["bubble_s"] == pytest.approx(plan.breakdown["compute_s"] * 3 / m)
    with pytest.raises(ValueError):
        p.plan(8 * 2)                                     # 2 samples per rank < pp=4
    assert not p.is_valid(24) and p.is_valid(32)


def test_hierarchical_beats_flat_across_nodes_with_slow_ib():
    slow = gpt13b_planner("nodes=8,gpus_per_node=8,nvlink_GBps=600,ib_Gbps=1x100,gpu=a100-80gb")
    t = slow.reduction_times()
    assert t["hierarchical"] < t["flat"]
    assert slow.plan(256).reduction == "hierarchical"
    one_node = gpt13b_planner("nodes=1,gpus_per_node=8,gpu=a100-80gb", dp_size=8)
    assert set(one_node.reduction_times()) == {"flat"}
    single = gpt13b_planner("nodes=1,gpus_per_node=1", dp_size=1)
    assert single.plan(4).reduction == "none" and single.plan(4).breakdown["comm_s"] == 0


def test_throughput_grows_with_batch_and_comm_is_exposed_when_slow():
    p = gpt13b_planner("nodes=8,gpus_per_node=8,ib_Gbps=1x100,gpu=a100-80gb")
    tps = [p.plan(b).predicted_tokens_per_s for b in (256, 512, 1024, 2048)]
    assert tps == sorted(tps)
    assert p.plan(256).breakdown["exposed_comm_s"] > 0


def test_layout_errors_and_state_dict():
    with pytest.raises(ValueError, match="exceeds"):
        gpt13b_planner(dp_size=128)
    with pytest.raises(ValueError, match="one sample does not fit"):
        gpt13b_planner(max_micro_batch_size=0)
    p = gpt13b_planner()
    q = gpt13b_planner(mfu_assumed=0.3, dp_size=32)
    q.load_state_dict(p.state_dict())
    assert q.plan(512) == p.plan(512)


# ----------------------------------------------------------------------------- issue 15
def test_split_minimises_time_and_prime_batches_are_inefficient():
    """Fewer, larger micro-batches are faster (per-micro-batch efficiency); a prime per-rank
    batch can only run micro-batch 1, so growth leaves it out."""
    p = gpt13b_planner(max_micro_batch_size=13)
    assert p.plan(64 * 36).micro_batch_size == 12 and p.plan(64 * 36).num_microbatches == 3
    slow, fast = p.plan(64 * 37), p.plan(64 * 36)
    assert slow.micro_batch_size == 1 and p.is_valid(64 * 37)
    assert slow.predicted_tokens_per_s < 0.9 * fast.predicted_tokens_per_s
    assert slow.split_efficiency < 0.9 < 0.99 < fast.split_efficiency <= 1.0
    assert 64 * 37 not in p.valid_global_batches(64 * 30, 64 * 40)
    assert 64 * 37 in p.efficient_batches(64 * 30, 64 * 40, min_efficiency=0.0)
    assert p.split_efficiency(64 * 37 + 1) == 0.0  # not a multiple of dp: not runnable


def test_simulator_readme_run_avoids_micro_batch_1(capsys):
    """The README's 1.3B / 8 x 8 A100 simulation: the memory planner allows micro-batch 13;
    no growth step may land on a split with micro-batch 1."""
    import os
    import runpy

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sim = runpy.run_path(os.path.join(root, "examples", "simulate_batch_growth.py"),
                         run_name="sim")
    argv = ["--model", "gpt-1.3b", "--seq-length", "2048", "--topology", A100_64,
            "--bnoise-path", "200:4000", "--batch-growth", "gns", "--batch-growth-max", "4096"]
    sim["main"](argv)
    out = capsys.readouterr().out
    assert "max micro-batch 13 (megatron_ext.memory_planner)" in out
    head = out.splitlines().index(next(ln for ln in out.splitlines() if "global_batch" in ln))
    rows = [ln.split() for ln in out.splitlines()[head + 1:] if ln.split()[0].isdigit()]
    assert len(rows) >= 5 and all(int(r[4]) > 1 for r in rows), rows  # grows on the grid


def test_measured_step_times_refine_k_and_overhead():
    """Measured times made with a known (k, t_half) at two micro-batch sizes are fitted
    back; the prediction of an unmeasured split follows the fit."""
    p = gpt13b_planner(max_micro_batch_size=8, device_model=False)
    assert math.isnan(p.plan(512).predicted_step_time_s)
    assert p.predict_step_time(4, 2) is None and "no step-time model" in p.describe()
    k, t_half = 2e-6, 1500.0
    truth = lambda mbs, m: m * k * (mbs * 2048 + t_half)  # noqa: E731
    assert (p.plan(512).micro_batch_size, p.plan(512).num_microbatches) == (8, 1)
    p.observe(8, 1, truth(8, 1))
    assert p.plan(512).predicted_step_time_s == pytest.approx(truth(8, 1))
    assert "fitted to 1" in p.plan(512).step_time_source
    p.observe(1, 8, truth(1, 8))
    assert p.step_time.fit() == pytest.approx((k, t_half))
    assert p.predict_step_time(8, 3) == pytest.approx(truth(8, 3))
    q = gpt13b_planner(max_micro_batch_size=8, device_model=False)
    q.load_step_time(p.step_time.state_dict())
    assert q.predict_step_time(8, 3) == pytest.approx(truth(8, 3))
    # the split stays the prior model's choice (the same on every rank)
    assert q.plan(64 * 12).micro_batch_size == p.plan(64 * 12).micro_batch_size == 6


def test_reduction_times_api_for_dp_reduction():
    from megatron_ext.batch_growth.topology import predict_reduction_times

    slow = gpt13b_planner("nodes=8,gpus_per_node=8,nvlink_GBps=600,ib_Gbps=1x100,gpu=a100-80gb")
    t = predict_reduction_times(slow.topology, slow.grad_bytes(), 64)
    assert t == slow.reduction_times() and t["hierarchical"] < t["flat"]
    by = slow.step_time_by_reduction(512)
    assert by["hierarchical"] < by["flat"]
    assert by[slow.plan(512).reduction] == pytest.approx(slow.plan(512).predicted_step_time_s)


def test_component_reports_prediction_beside_measurement():
    """The growth component logs the step time predicted before the step beside the
    measured one (TensorBoard via metrics()); on CPU it has no model before measuring."""
    from types import SimpleNamespace

    from megatron_ext.batch_growth import BatchGrowthConfig
    from megatron_ext.batch_growth.component import BatchGrowthComponent

    p = gpt13b_planner(device_model=False)
    comp = BatchGrowthComponent(BatchGrowthConfig(batch_growth="gns", batch_growth_max=1024),
                                256, p, b_simple=lambda: None, log=None)
    assert "no step-time model for this device" in comp.describe()
    state = SimpleNamespace(iteration=1, consumed_samples=256, consumed_tokens=256 * 2048,
                            global_batch_size=256, micro_batch_size=4, num_microbatches=1)
    comp.after_step(state, 0.5)
    assert comp.metrics(state) == {}  # nothing was predicted for the first step
    state.iteration = 2
    comp.after_step(state, 0.6)
    m = comp.metrics(state)
    assert m["predicted_step_time_ms"] == pytest.approx(500.0)
    assert m["measured_step_time_ms"] == pytest.approx(600.0)
    assert m["step_time_prediction_error"] == pytest.approx(500 / 600 - 1)
    q = gpt13b_planner(device_model=False)
    fresh = BatchGrowthComponent(BatchGrowthConfig(batch_growth="gns", batch_growth_max=1024),
                                 256, q, b_simple=lambda: None, log=None)
    fresh.load_state_dict(comp.state_dict())
    assert q.predict_step_time(4, 1) == pytest.approx(p.predict_step_time(4, 1))


def test_estimator_replaces_warmup_step_then_averages():
    from megatron_ext.batch_growth.step_time import StepTimeEstimator

    est = StepTimeEstimator(None, overhead_tokens=0.0, ema=0.5)
    assert est.micro_batch_time(100) is None
    for seconds in (9.0, 1.0, 3.0):  # warm-up 9 s is dropped; then EMA 0.5
        est.observe(1, 1, tokens=100, slots=1, fixed_s=0.0, seconds=seconds)
    assert est.micro_batch_time(100) == pytest.approx(2.0)
    est.observe(1, 1, tokens=100, slots=1, fixed_s=0.0, seconds=-1)  # ignored
    assert est.points["1,1"][4] == 3


def test_auto_topology_is_rank_zeros(monkeypatch):
    """`--topology auto`: every rank plans on rank 0's detection (a node that reads its links
    differently must not plan other batches: the collectives would mismatch)."""
    import torch

    from megatron_ext.batch_growth.topology import parse_topology
    from megatron_ext.training import components

    rank0 = parse_topology("nodes=2,gpus_per_node=8,gpu=h100-80gb")
    mine = parse_topology("nodes=2,gpus_per_node=4,gpu=a100-40gb")
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 16)
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    monkeypatch.setattr(components, "detect", lambda: mine)
    sent = []

    def broadcast(box, src):
        sent.append((list(box), src))
        box[0] = rank0

    monkeypatch.setattr(dist, "broadcast_object_list", broadcast)
    assert components.job_topology("auto") == rank0
    assert sent == [([None], 0)]  # a rank other than 0 does not even detect
    assert components.job_topology("nodes=1,gpus_per_node=2") == parse_topology(
        "nodes=1,gpus_per_node=2")
