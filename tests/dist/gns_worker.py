"""torchrun worker for tests/test_gns_*.py: GNS per-sample norms == brute force.

Run: ``torchrun --nproc_per_node N tests/dist/gns_worker.py --tp T --pp P --out res.json``
(CPU, gloo; data-parallel size = N / (T * P)). On a tiny GPT built with the GNS layers:

1. brute force (only when DP == 1): one forward/backward per single sample through the real
   Megatron schedule + DDP + finalize_model_grads (plain megatron path, no kernel), then
   |g_i|^2 over the tracked parameters (TP shards summed, TP duplicates once, PP summed) and
   |mean_i g_i|^2 (and of each half batch, the small batch of the data-parallel estimator);
   with --per-token-loss the single-sample grads are rescaled to h_i = (B / N) * token-sum
   grad, the per-sample gradient of Megatron's calculate_per_token_loss;
2. one GNS step over the same global batch with M micro-batches: the tracker's per-sample
   norms and |G_B|^2;
3. a few optimizer steps with the tracker: B_simple must be finite.
Flags: --tp/--pp/--no-sp/--recompute/--normalization, --micro-batches/--micro-batch-size,
--estimator, --include-embedding/--tie, --dist-opt, --per-token-loss, --structured.
Rank 0 writes everything to --out as JSON; the test compares (also across runs).
"""
import argparse
import json
import math

import torch
import torch.distributed as dist

from megatron_ext import cpu_backend

cpu_backend.enable_cpu_backend(force=True)

from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.distributed import DistributedDataParallel as DDP  # noqa: E402
from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.num_microbatches_calculator import init_num_microbatches_calculator  # noqa: E402
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from megatron_ext.gns import GNSConfig  # noqa: E402
from megatron_ext.gns.layers import gns_layer_spec_kwargs  # noqa: E402
from megatron_ext.gns.tracker import GNSTracker  # noqa: E402
from megatron_ext.model.layer_spec import get_gpt_block_spec, get_gpt_layer_spec  # noqa: E402

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
                   help="calculate_per_token_loss with a loss mask (~25%% of tokens masked)")
    p.add_argument("--structured", action="store_true",
                   help="learnable data (arithmetic token sequences) instead of random tokens")
    p.add_argument("--out", required=True)
    return p.parse_args()


def build(args):
    cfg = TransformerConfig(
        num_layers=2, hidden_size=HIDDEN, num_attention_heads=4, use_cpu_initialization=True,
        tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
        sequence_parallel=args.tp > 1 and not args.no_sp, pipeline_dtype=torch.float32,
        normalization=args.normalization,
        recompute_granularity="full" if args.recompute else None,
        recompute_method="uniform" if args.recompute else None,
        recompute_num_layers=1 if args.recompute else None,
        hidden_dropout=0.0, attention_dropout=0.0, bias_dropout_fusion=False,
        masked_softmax_fusion=False, gradient_accumulation_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False,
        calculate_per_token_loss=args.per_token_loss)
    kw = gns_layer_spec_kwargs()
    spec = get_gpt_block_spec(cfg, get_gpt_layer_spec(**kw), norm=kw["norm"])
    model = GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=VOCAB,
                     max_sequence_length=SEQ, pre_process=ps.is_pipeline_first_stage(),
                     post_process=ps.is_pipeline_last_stage(), position_embedding_type="rope",
                     share_embeddings_and_output_weights=args.tie)
    ddp = DDP(cfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                 use_distributed_optimizer=args.dist_opt), model)
    return cfg, ddp


def run_schedule(ddp, samples, mbs, masks=None):
    """Forward/backward over `samples` [n, SEQ+1] in micro-batches of mbs (finalize included).

    masks: None (mean-token loss per micro-batch) or [n, SEQ] loss masks (token-sum loss
    and token count: megatron's calculate_per_token_loss form).
    """
    def fwd(it, model):
        b, mask = next(it)
        tokens, labels = b[:, :-1].contiguous(), b[:, 1:].contiguous()
        pos = torch.arange(SEQ).unsqueeze(0).expand(tokens.shape[0], -1)
        out = model(tokens, pos, None, labels=labels)

        def loss_fn(t):
            if mask is None:
                loss = t.float().mean()  # mean over the micro-batch's tokens
                return loss, {"lm loss": loss.detach()}
            loss = (t.float() * mask).sum()
            return loss, mask.sum().to(torch.int), {"lm loss": loss.detach()}
        return out, loss_fn

    m = samples.shape[0] // mbs
    it = iter([(samples[i * mbs:(i + 1) * mbs],
                None if masks is None else masks[i * mbs:(i + 1) * mbs]) for i in range(m)])
    return get_forward_backward_func()(
        forward_step_func=fwd, data_iterator=it, model=[ddp], num_microbatches=m,
        seq_length=SEQ, micro_batch_size=mbs, forward_only=False)


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
    dist.init_process_group("gloo")
    ps.initialize_model_parallel(tensor_model_parallel_size=args.tp,
                                 pipeline_model_parallel_size=args.pp)
    model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)
    cfg, ddp = build(args)
    M, mbs, dp = args.micro_batches, args.micro_batch_size, ps.get_data_parallel_world_size()
    init_num_microbatches_calculator(0, None, M * mbs * dp, mbs, dp)
    tracker = GNSTracker(GNSConfig(gns=True, gns_estimator=args.estimator,
                                  gns_include_embedding=args.include_embedding), [ddp])
    cfg.finalize_model_grads_func = tracker.wrap_finalize_model_grads(finalize_model_grads)
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, VOCAB, (args.steps + 1, dp * M * mbs, SEQ + 1), generator=gen)
    if args.structured:  # token[t] = start + t * stride (mod V): a learnable signal
        start = torch.randint(0, VOCAB, data.shape[:2] + (1,), generator=gen)
        stride = torch.randint(1, 4, data.shape[:2] + (1,), generator=gen)
        data = (start + stride * torch.arange(SEQ + 1)) % VOCAB
    masks = None
    if args.per_token_loss:
        masks = (torch.rand(data.shape[:2] + (SEQ,), generator=gen) > 0.25).float()
    dp_rank = ps.get_data_parallel_rank()
    rows = slice(dp_rank * M * mbs, (dp_rank + 1) * M * mbs)
    local = lambda step: data[step, rows]  # noqa: E731
    local_mask = lambda step: None if masks is None else masks[step, rows]  # noqa: E731
    params = tracker.params
    from megatron_ext.gns.norm_grads import _use_triton
    from megatron_ext.kernels import kernel_backend

    res = {"per_sample_brute": None, "batch_brute": None,
           "kernel_backend": kernel_backend(torch.empty(0)),
           "norm_grads_triton": _use_triton(torch.empty(0))}

    if dp == 1:  # brute force: one sample per forward/backward
        norms, mean = [], [torch.zeros_like(p, dtype=torch.float64) for p in params]
        half = [[torch.zeros_like(p, dtype=torch.float64) for p in params] for _ in range(2)]
        for i in range(M * mbs):
            ddp.zero_grad_buffer()
            mask_i = None if masks is None else local_mask(0)[i:i + 1]
            run_schedule(ddp, local(0)[i:i + 1], 1, mask_i)
            grads = [p.main_grad.detach().clone() for p in params]
            if masks is not None:  # finalize divided by n_i; h_i = (B / N) * token-sum grad
                n_i, n_all = float(mask_i.sum()), float(local_mask(0).sum())
                grads = [g * n_i * (M * mbs) / n_all for g in grads]
            norms.append(tracked_sq_norm(params, grads))
            for acc, g in zip(mean, grads):
                acc += g.double() / (M * mbs)
            for acc, g in zip(half[2 * i // (M * mbs)], grads):  # mean of each half batch
                acc += g.double() / (M * mbs // 2)
        res["per_sample_brute"] = norms
        res["batch_brute"] = tracked_sq_norm(params, mean)
        res["half_brute"] = [tracked_sq_norm(params, h) for h in half]

    ddp.zero_grad_buffer()
    tracker.begin_step(M, mbs)
    losses = run_schedule(ddp, local(0), mbs, local_mask(0))
    m = tracker.end_step(tokens=dp * M * mbs * SEQ)
    res["per_sample_gns"] = tracker.last_per_sample_sq_norms
    res["batch_gns"] = tracker.last_batch_sq_norm
    res["small_gns"] = tracker.last_small_sq_norms
    res["first"] = m.to_dict() if m is not None else None

    # (Megatron's distributed optimizer refuses CPU tensors: no optimizer steps then.)
    steps = 0 if args.dist_opt else args.steps
    if steps:
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1.0,
                                                     bf16=False, params_dtype=torch.float32),
                                     [ddp])
        for step in range(1, steps + 1):
            ddp.zero_grad_buffer()
            opt.zero_grad()
            tracker.begin_step(M, mbs)
            losses = run_schedule(ddp, local(step), mbs, local_mask(step))
            m = tracker.end_step(tokens=dp * M * mbs * SEQ)
            opt.step()
    res["b_simple"] = tracker.estimator.b_simple
    res["history_len"] = len(tracker.history)
    res["last"] = m.to_dict() if m is not None else None
    sd = tracker.state_dict()
    t2 = GNSTracker(GNSConfig(gns=True, gns_estimator=args.estimator,
                                  gns_include_embedding=args.include_embedding), [ddp])
    t2.load_state_dict(json.loads(json.dumps(sd)))
    res["state_roundtrip"] = t2.estimator.b_simple == tracker.estimator.b_simple
    res["loss_last"] = [float(x["lm loss"]) for x in losses] if losses else None
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(res, f)
    b = res["b_simple"]
    print(f"rank {dist.get_rank()} GNS_OK b_simple={b}" if b is not None and math.isfinite(b)
          else f"rank {dist.get_rank()} GNS b_simple={b}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
