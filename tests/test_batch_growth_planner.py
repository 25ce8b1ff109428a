"""Tests of megatron_ext.batch_growth.planner (validity, pp constraint, reduction choice)."""
import pytest

from megatron_ext.batch_growth import BatchPlanner, parse_topology
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
    plan = p.plan(512)
    gpus, peak = 64, parse_topology(A100_64).gpu_tflops * 1e12
    assert plan.breakdown["compute_s"] == pytest.approx(
        GPT_1_3B.flops_per_sample() * 512 / (gpus * peak * 0.5))
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
    plan = p.plan(8 * 16)                                 # 16 per rank: mbs 4, m 4 >= pp
    assert plan.micro_batch_size == 4 and plan.num_microbatches == 4
    assert plan.breakdown["bubble_s"] == pytest.approx(plan.breakdown["compute_s"] * 3 / 4)
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
