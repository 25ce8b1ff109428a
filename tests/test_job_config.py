"""The job configuration: flags map 1:1 to typed fields, every bad combination names its flag,
defaults that depend on other sections are derived as Megatron does, nothing is written
back into the argparse namespace."""

import dataclasses

import pytest

from megatron_ext.training.job import SECTIONS, JobConfig, build_parser, check_machine, parse_job


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
        (["--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "33"], 2,
         "--seq-length"),
        (["--gns", "--gns-estimator", "data-parallel"], 1, "--gns-estimator"),
        (["--gns", "--gns-include-embedding", "--pipeline-model-parallel-size", "2",
          "--global-batch-size", "4"], 2, "--gns-include-embedding"),
        (["--gns", "--context-parallel-size", "2"], 2, "--context-parallel-size"),
        (["--batch-growth", "gns", "--batch-growth-max", "8"], 1, "--gns"),
        (["--lr-scaling", "sqrt"], 1, "--batch-growth"),
        (["--batch-growth", "ramp", "--batch-growth-max", "12", "--rampup-batch-size", "4", "5",
          "24"], 1, "--rampup-batch-size"),
        # flags that used to pass silently, crash, or name the wrong flag
        (["--train-iters", "20", "--train-samples", "200"], 1, "--train-samples"),
        (["--clip-grad", "-1"], 1, "--clip-grad"),
        (["--exit-interval", "-1"], 1, "--exit-interval"),
        (["--global-batch-size", "0"], 1, "--global-batch-size"),
        (["--global-batch-size", "-4"], 1, "--global-batch-size"),
        (["--lr", "0"], 1, "--lr"),
        (["--lr", "-1"], 1, "--lr"),
        (["--weight-decay", "-5"], 1, "--weight-decay"),
        (["--adam-beta1", "1.5"], 1, "--adam-beta1"),
        (["--exit-duration-in-mins", "0"], 1, "--exit-duration-in-mins"),
        (["--keep-last", "0", "--save", "x"], 1, "--keep-last"),
    ],
)
def test_bad_flags_name_the_flag(argv, world, flag):
    with pytest.raises(ValueError, match=flag.replace("-", r"\-")):
        parse_job(argv, world_size=world)


@pytest.mark.parametrize("argv,flag", [(["--load", "/nonexistent/ckpt"], "--load"),
                                       (["--bf16"], "--bf16")])
def test_machine_checks_name_the_flag(argv, flag):
    job = parse_job(argv, world_size=1)
    with pytest.raises(ValueError, match=flag.replace("-", r"\-")):
        check_machine(job, cuda=False)


def test_derived_defaults():
    job = parse_job(["--micro-batch-size", "2", "--train-iters", "10",
                     "--recompute-granularity", "full"], world_size=4)
    assert job.data_parallel_size == 4
    assert job.training.global_batch_size == 8
    assert (job.recompute.recompute_method, job.recompute.recompute_num_layers) == ("uniform", 1)
    assert job.schedule.lr_decay_samples == 10 * 8
    assert job.model.max_position_embeddings == job.model.seq_length


def test_train_samples_sets_an_iteration_bound():
    job = parse_job(["--train-samples", "100", "--global-batch-size", "8",
                     "--micro-batch-size", "2"], world_size=1)
    assert job.training.train_iters == 13
    assert job.schedule.lr_decay_samples == 100


def test_every_flag_is_exactly_one_field():
    """1:1: each flag's dest is a field of exactly one section, and each field has a flag."""
    parser = build_parser()
    dests = [a.dest for a in parser._actions if a.dest != "help"]
    fields = [f.name for _, cls in SECTIONS for f in dataclasses.fields(cls) if f.init]
    assert len(fields) == len(set(fields)), "a field name is used by two sections"
    assert sorted(dests) == sorted(fields)
    for action in parser._actions:  # --foo-bar <-> foo_bar (plus Megatron-LM's spellings)
        if action.dest != "help":
            assert action.option_strings[0] == "--" + action.dest.replace("_", "-")
            for alias in action.option_strings[1:]:
                assert alias.lstrip("-").replace("-", "_") == action.dest


def test_namespace_is_not_written_back():
    ns = build_parser().parse_args(["--train-samples", "100", "--global-batch-size", "8"])
    before = dict(vars(ns))
    job = JobConfig.from_args(ns, world_size=1)
    assert vars(ns) == before and ns.lr_decay_samples is None
    assert job.schedule.lr_decay_samples == 100


def test_help_text_comes_from_field_docstrings():
    text = build_parser().format_help()
    assert "Samples per optimizer step (default micro x DP)" in text
    assert "linear (Goyal et al. 2017)" in text  # "et al." does not end the sentence


def test_out_of_memory_error_explains_the_plan_and_the_knobs():
    import torch

    from megatron_ext.training.errors import out_of_memory
    from megatron_ext.training.memory_report import out_of_memory_advice

    job = parse_job(["--num-layers", "8", "--hidden-size", "2048", "--num-attention-heads", "16",
                     "--seq-length", "16384", "--max-position-embeddings", "16384",
                     "--micro-batch-size", "2", "--global-batch-size", "2",
                     "--attention-backend", "local", "--train-iters", "1"], world_size=1)
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB. GPU 0\nmore")
    msg = str(out_of_memory(oom, 3, out_of_memory_advice(job, job.model_shape(257))))
    assert msg.startswith("iteration 3: CUDA out of memory. Tried to allocate 16.00 GiB. GPU 0;")
    assert "the planner predicts" in msg and "GiB per GPU" in msg
    for knob in ("--recompute-granularity full", "--micro-batch-size", "--attention-backend auto"):
        assert knob in msg
