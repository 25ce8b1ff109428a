"""torchrun worker for tests/test_gns_*.py: GNS per-sample norms == brute force.

Run: ``torchrun --nproc_per_node N tests/dist/gns_worker.py --tp T --pp P --out res.json``
(CPU, gloo; data-parallel size = N / (T * P)). The worker's flags become a training job
(``parse_job`` with ``--gns``), and the GPT is the one training builds from it
(``initialize_megatron``, ``GNSComponent.model_options``, ``build_gpt``, weights initialised
by name, so TP=2 holds the same full weights as TP=1). On that tiny GPT:

1. brute force (only when DP == 1): one forward/backward per single sample through the real
   Megatron schedule + DDP + finalize_model_grads (the GNS layers idle: plain megatron path,
   no kernel), then |h_i|^2 over the tracked parameters (TP shards summed, TP duplicates
   once, PP summed) and |mean_i h_i|^2 (and of each half batch, the small batch of the
   data-parallel estimator). Training always uses Megatron's calculate_per_token_loss
   (loss = masked token sum, finalize divides by the global token count N), so the
   single-sample grads are rescaled to h_i = (B / N) * token-sum grad. Without
   --per-token-loss the mask is all ones and h_i is the gradient of sample i's mean-token
   loss;
2. one GNS step over the same global batch with M micro-batches, as the training loop runs
   it (``on_step_start``, schedule, ``after_backward``): the tracker's per-sample norms and
   |G_B|^2;
3. a few optimizer steps (the job's optimizer) with the measurement: B_simple must be finite.
Flags: --tp/--pp/--no-sp/--recompute/--normalization, --micro-batches/--micro-batch-size,
--estimator, --include-embedding/--tie, --dist-opt, --per-token-loss, --structured; model
placements --gns can meet: --qk-layernorm, --swiglu, --num-query-groups (GQA),
--disable-bias-linear; --gns-route forces a dW route.
Rank 0 writes everything to --out as JSON; the test compares (also across runs).
"""
import os
import sys

# CPU + gloo even on a GPU machine: several ranks share one process tree, and the brute
# force compares against the CPU reference path of the kernels.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron.core import parallel_state as ps  # noqa: E402

from gpt_helpers import build, forward_backward, micro_batches  # noqa: E402
from megatron_ext.gns.component import GNSComponent  # noqa: E402
from megatron_ext.training.initialize import initialize_megatron  # noqa: E402
from megatron_ext.training.job import parse_job  # noqa: E402
from megatron_ext.training.model import build_optimizer  # noqa: E402
from megatron_ext.training.state import TrainState  # noqa: E402

SEQ, VOCAB, HIDDEN = 16, 128, 32


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--micro-batches", type=int, default=2)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--estimator", default="per-sample")
    p.add_argument("--recompute", action="store_true")
    p.add_argument("--no-sp", action="store_true", help="TP without sequence parallelism")
    p.add_argument("--normalization", default="LayerNorm")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--include-embedding", action="store_true")
    p.add_argument("--tie", action="store_true", help="tied embedding/output weights")
    p.add_argument("--dist-opt", action="store_true", help="Megatron's distributed optimizer")
    p.add_argument("--per-token-loss", action="store_true",
                   help="a random loss mask (~25%% of tokens masked) instead of all ones")
    p.add_argument("--structured", action="store_true",
                   help="learnable data (arithmetic token sequences) instead of random tokens")
    # 4 random-token samples make a very noisy |G|^2 estimate whose sign depends on the
    # weights: seed 3 gives a positive B_simple in every configuration the tests assert it.
    p.add_argument("--seed", type=int, default=3, help="--seed of the job (the weights)")
    p.add_argument("--qk-layernorm", action="store_true", help="norms on [s, b, heads, d] q/k")
    p.add_argument("--swiglu", action="store_true")
    p.add_argument("--num-query-groups", type=int, default=None, help="GQA")
    p.add_argument("--disable-bias-linear", action="store_true")
    p.add_argument("--gns-route", default="auto")
    p.add_argument("--out", required=True)
    return p.parse_args()


def job_flags(args, world_size):
    """The training flags of the worker's GPT and GNS measurement."""
    dp = world_size // (args.tp * args.pp)
    flags = [
        "--num-layers", "2", "--hidden-size", str(HIDDEN), "--num-attention-heads", "4",
        "--seq-length", str(SEQ), "--make-vocab-size-divisible-by", "64", "--seed", str(args.seed),
        "--normalization", args.normalization,
        "--tensor-model-parallel-size", str(args.tp),
        "--pipeline-model-parallel-size", str(args.pp),
        "--micro-batch-size", str(args.micro_batch_size),
        "--global-batch-size", str(dp * args.micro_batches * args.micro_batch_size),
        "--gns", "--gns-estimator", args.estimator, "--gns-route", args.gns_route,
    ]
    for flag in ("qk_layernorm", "swiglu", "disable_bias_linear"):
        if getattr(args, flag):
            flags.append("--" + flag.replace("_", "-"))
    if args.num_query_groups:
        flags += ["--num-query-groups", str(args.num_query_groups)]
    if args.tp > 1 and not args.no_sp:
        flags.append("--sequence-parallel")
    if args.recompute:
        flags += ["--recompute-granularity", "full", "--recompute-method", "uniform",
                  "--recompute-num-layers", "1"]
    if not args.tie:
        flags.append("--untie-embeddings-and-output-weights")
    if args.include_embedding:
        flags.append("--gns-include-embedding")
    if args.dist_opt:
        flags.append("--use-distributed-optimizer")
    return flags


def tracked_sq_norm(params, grads):
    """Brute-force rule, written independently of the tracker: |g|^2 over the full model."""
    tp_rank = ps.get_tensor_model_parallel_rank()
    local = torch.zeros((), dtype=torch.float64)
    for p, g in zip(params, grads):
        if getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
            local += g.double().square().sum()
    dist.all_reduce(local, group=ps.get_model_parallel_group())
    return float(local)


def main():
    args = parse()
    job = parse_job(job_flags(args, int(os.environ["WORLD_SIZE"])))
    initialize_megatron(job)
    gns = GNSComponent(job.gns)  # before the model: its layers take the tracker as recorder
    built = build(job, VOCAB, gns.model_options())
    ddp, tracker = built.ddp, gns.tracker
    gns.attach([ddp], built.config)
    t = job.training
    M, mbs, dp = job.num_microbatches, t.micro_batch_size, job.data_parallel_size
    state = TrainState(SEQ, t.global_batch_size, mbs, dp)
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, VOCAB, (args.steps + 1, dp * M * mbs, SEQ + 1), generator=gen)
    if args.structured:  # token[t] = start + t * stride (mod V): a learnable signal
        start = torch.randint(0, VOCAB, data.shape[:2] + (1,), generator=gen)
        stride = torch.randint(1, 4, data.shape[:2] + (1,), generator=gen)
        data = (start + stride * torch.arange(SEQ + 1)) % VOCAB
    masks = torch.ones(data.shape[:2] + (SEQ,))
    if args.per_token_loss:
        masks = (torch.rand(data.shape[:2] + (SEQ,), generator=gen) > 0.25).float()
    dp_rank = ps.get_data_parallel_rank()
    rows = slice(dp_rank * M * mbs, (dp_rank + 1) * M * mbs)
    local = lambda step: data[step, rows]  # noqa: E731
    local_mask = lambda step: masks[step, rows]  # noqa: E731
    params = tracker.params
    from megatron_ext.kernels import kernel_backend, norm_param_backend

    res = {"per_sample_brute": None, "batch_brute": None,
           "kernel_backend": kernel_backend(torch.empty(0)),
           "norm_grads_triton": norm_param_backend(torch.empty(0)) == "triton-interpret"}

    if dp == 1:  # brute force: one sample per forward/backward, the GNS layers idle
        norms, mean = [], [torch.zeros_like(p, dtype=torch.float64) for p in params]
        half = [[torch.zeros_like(p, dtype=torch.float64) for p in params] for _ in range(2)]
        for i in range(M * mbs):
            ddp.zero_grad_buffer()
            mask_i = local_mask(0)[i:i + 1]
            forward_backward(ddp, micro_batches(local(0)[i:i + 1], 1, mask_i))
            # finalize divided by n_i; h_i = (B / N) * token-sum grad
            n_i, n_all = float(mask_i.sum()), float(local_mask(0).sum())
            grads = [g.detach() * n_i * (M * mbs) / n_all for g in (p.main_grad for p in params)]
            norms.append(tracked_sq_norm(params, grads))
            for acc, g in zip(mean, grads):
                acc += g.double() / (M * mbs)
            for acc, g in zip(half[2 * i // (M * mbs)], grads):  # mean of each half batch
                acc += g.double() / (M * mbs // 2)
        res["per_sample_brute"] = norms
        res["batch_brute"] = tracked_sq_norm(params, mean)
        res["half_brute"] = [tracked_sq_norm(params, h) for h in half]

    def train_step(step, optimizer=None):
        """One step as the training loop runs it (the measurement between backward and
        the optimizer); returns the schedule's loss reports."""
        ddp.zero_grad_buffer()
        if optimizer is not None:
            optimizer.zero_grad()
        gns.on_step_start(state)
        losses = forward_backward(ddp, micro_batches(local(step), mbs, local_mask(step)))
        gns.after_backward(state)  # tokens: consumed by the end of this step
        if optimizer is not None:
            optimizer.step()
        state.advance()
        return losses

    losses = train_step(0)  # no optimizer step: the same weights as the brute force
    m = gns.last
    res["per_sample_gns"] = tracker.last_per_sample_sq_norms
    res["batch_gns"] = tracker.last_batch_sq_norm
    res["small_gns"] = tracker.last_small_sq_norms
    res["first"] = m.to_dict() if m is not None else None

    # (Megatron's distributed optimizer refuses CPU tensors: no optimizer steps then.)
    steps = 0 if args.dist_opt else args.steps
    if steps:
        optimizer = build_optimizer(job, built.config, ddp)
        for step in range(1, steps + 1):
            losses = train_step(step, optimizer)
            m = gns.last
    res["b_simple"] = tracker.estimator.b_simple
    res["history_len"] = len(tracker.history)
    res["last"] = m.to_dict() if m is not None else None
    restored = GNSComponent(job.gns)
    restored.load_state_dict(json.loads(json.dumps(gns.state_dict())))
    res["state_roundtrip"] = restored.tracker.estimator.b_simple == tracker.estimator.b_simple
    # per-token mean loss of each micro-batch of the last step (last pipeline stage only)
    res["loss_last"] = [float(x["lm loss"][0] / x["lm loss"][1]) for x in losses] or None
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(res, f)
    b = res["b_simple"]
    print(f"rank {dist.get_rank()} GNS_OK b_simple={b}" if b is not None and math.isfinite(b)
          else f"rank {dist.get_rank()} GNS b_simple={b}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
