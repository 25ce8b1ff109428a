"""Flag validation: every bad combination names its flag; defaults are derived as Megatron does."""

import pytest

from megatron_ext.training.arguments import ArgumentError, parse_args


@pytest.mark.parametrize(
    "argv,world,flag",
    [
        (["--global-batch-size", "6", "--micro-batch-size", "4"], 1, "--global-batch-size"),
        (["--global-batch-size", "4"], 4, "--global-batch-size"),  # 4 % (2 x 4)
        (["--sequence-parallel"], 1, "--sequence-parallel"),
        (["--tensor-model-parallel-size", "2"], 3, "world size"),
        (["--tensor-model-parallel-size", "2", "--num-attention-heads", "3"], 2, "--num-attention-heads"),
        (["--num-query-groups", "3", "--num-attention-heads", "4"], 1, "--num-query-groups"),
        (["--pipeline-model-parallel-size", "2", "--num-layers", "3"], 2, "--num-layers"),
        (["--pipeline-model-parallel-size", "2", "--global-batch-size", "2"], 2, "micro-batches"),
        (["--bf16", "--fp16"], 1, "--bf16"),
        (["--recompute-method", "block"], 1, "--recompute-granularity"),
        (["--min-lr", "1", "--lr", "0.1"], 1, "--min-lr"),
        (["--save-interval", "5"], 1, "--save"),
        (["--load", "/nonexistent/ckpt"], 1, "--load"),
        (["--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "33"], 2,
         "--seq-length"),
    ],
)
def test_bad_flags_name_the_flag(argv, world, flag):
    with pytest.raises(ArgumentError, match=flag.replace("-", r"\-")):
        parse_args(argv, world_size=world)


def test_derived_defaults():
    args = parse_args(["--micro-batch-size", "2", "--train-iters", "10",
                       "--recompute-granularity", "full"], world_size=4)
    assert args.data_parallel_size == 4
    assert args.global_batch_size == 8
    assert (args.recompute_method, args.recompute_num_layers) == ("uniform", 1)
    assert args.lr_decay_samples == 10 * 8
    assert args.max_position_embeddings == args.seq_length


def test_train_samples_sets_an_iteration_bound():
    args = parse_args(["--train-samples", "100", "--global-batch-size", "8",
                       "--micro-batch-size", "2"], world_size=1)
    assert args.train_iters == 13
    assert args.lr_decay_samples == 100


def test_out_of_memory_error_explains_the_plan_and_the_knobs():
    import torch

    from megatron_ext.training.loop import _feature_configs, _out_of_memory

    args = parse_args(["--num-layers", "8", "--hidden-size", "2048", "--num-attention-heads", "16",
                       "--seq-length", "16384", "--max-position-embeddings", "16384",
                       "--micro-batch-size", "2", "--global-batch-size", "2",
                       "--attention-backend", "local", "--train-iters", "1"], world_size=1)
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB. GPU 0\nmore")
    msg = str(_out_of_memory(oom, 3, args, _feature_configs(args), 257))
    assert msg.startswith("iteration 3: CUDA out of memory. Tried to allocate 16.00 GiB. GPU 0;")
    assert "the planner predicts" in msg and "GiB per GPU" in msg
    for knob in ("--recompute-granularity full", "--micro-batch-size", "--attention-backend auto"):
        assert knob in msg
