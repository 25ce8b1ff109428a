"""torchrun worker for tests/test_ring_attention.py: CP ring attention == full causal attention.

Run: ``torchrun --nproc_per_node 2 tests/dist/ring_attention_worker.py`` (CPU, gloo). The
process group and parallel state come from the product's ``initialize_megatron`` of a job
with ``--context-parallel-size`` = all ranks. Checks, on that context-parallel group:

1. ``ring_attention`` output and q/k/v grads equal full attention on the gathered sequence
   (MHA/GQA, causal/no_mask, fp32 and bf16), also through ``SDPACoreAttention``'s CP path
   (one bare core-attention module: the unit under test);
2. ``split_batch_for_context_parallel`` round-trips through ``gather_from_context_parallel``,
   and megatron's RoPE slice (``get_pos_emb_on_this_cp_rank``) is the same split;
3. the tiny GPT that training builds with CP (``build_gpt``) gives the same per-token
   losses as the same GPT without CP (same weights: initialised by name), and one training
   forward/backward of it (schedule, DDP, finalize over the CP group) gives the gradients of
   the global per-token mean that the full-sequence model gets.
Prints ``RING_OK`` on success.
"""
import os
import sys

# CPU + gloo even on a GPU machine (both ranks would share one GPU).
os.environ["CUDA_VISIBLE_DEVICES"] = ""
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megatron.core import parallel_state  # noqa: E402
from megatron.core.models.common.embeddings.rotary_pos_embedding import (  # noqa: E402
    RotaryEmbedding,
)
from megatron.core.process_groups_config import ProcessGroupCollection  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from gpt_helpers import build, forward_backward, loss_totals, micro_batches  # noqa: E402
from megatron_ext.model.attention import SDPACoreAttention  # noqa: E402
from megatron_ext.model.ring_attention import (  # noqa: E402
    gather_from_context_parallel,
    ring_attention,
    split_batch_for_context_parallel,
)
from megatron_ext.training.hooks import ModelOptions  # noqa: E402
from megatron_ext.training.initialize import initialize_megatron  # noqa: E402
from megatron_ext.training.job import parse_job  # noqa: E402

# The tiny GQA GPT of check 3 (the job adds --context-parallel-size).
GPT_FLAGS = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
             "--num-query-groups", "2", "--seq-length", "16", "--max-position-embeddings", "32",
             "--micro-batch-size", "2", "--make-vocab-size-divisible-by", "64",
             "--attention-backend", "sdpa", "--seed", "0"]
VOCAB = 64

TOL = dict(atol=2e-5, rtol=2e-5)


def split(t, seq_dim=0):
    return split_batch_for_context_parallel({"t": t}, CP_RANK, CP, seq_dim)["t"]


def reference(q, k, v, causal, scale):
    """Full attention on [s, b, h, d] via SDPA (GQA by repeating K/V)."""
    r = q.size(2) // k.size(2)
    out = F.scaled_dot_product_attention(
        q.permute(1, 2, 0, 3), k.repeat_interleave(r, 2).permute(1, 2, 0, 3),
        v.repeat_interleave(r, 2).permute(1, 2, 0, 3), is_causal=causal, scale=scale,
    )
    return out.permute(2, 0, 1, 3).flatten(2)


def check_ring(heads, groups, causal, via_module=False, s=24, b=2, hn=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(heads * 10 + groups + causal)
    # inputs exactly representable in ``dtype``, so the fp32 reference sees the same numbers
    q, k, v = (
        torch.randn(s, b, n, hn, generator=g).to(dtype).float().requires_grad_()
        for n in (heads, groups, groups)
    )
    dout = torch.randn(s, b, heads * hn, generator=g)
    scale = hn**-0.5
    ref = reference(q, k, v, causal, scale)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    tol = TOL if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)

    lq, lk, lv = (split(t.detach()).to(dtype).requires_grad_() for t in (q, k, v))
    if via_module:
        cfg = TransformerConfig(num_layers=1, hidden_size=heads * hn, num_attention_heads=heads,
                                num_query_groups=groups, context_parallel_size=CP,
                                attention_dropout=0.0, use_cpu_initialization=True)
        mask = AttnMaskType.causal if causal else AttnMaskType.no_mask
        mod = SDPACoreAttention(config=cfg, layer_number=1, attn_mask_type=mask,
                                attention_type="self")
        out = mod(lq, lk, lv, None)
    else:
        out = ring_attention(lq, lk, lv, scale, CP_GROUP, causal=causal)
    assert out.dtype == dtype
    grads = torch.autograd.grad(out, (lq, lk, lv), split(dout).to(dtype))
    torch.testing.assert_close(out.float(), split(ref.detach()), **tol)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.float(), split(want), **tol)


def check_split_roundtrip():
    b, s = 3, 16
    batch = {
        "tokens": torch.arange(b * s).view(b, s),
        "labels": torch.arange(b * s).view(b, s) + 1,
        "loss_mask": torch.rand(b, s, generator=torch.Generator().manual_seed(0)),
        "position_ids": torch.arange(s).expand(b, -1),
        "attention_mask": None,
    }
    local = split_batch_for_context_parallel(batch, CP_RANK, CP)
    assert local["attention_mask"] is None and local["tokens"].shape == (b, s // CP)
    # chunks CP_RANK and 2cp-1-CP_RANK of the sequence
    c = s // (2 * CP)
    want = list(range(CP_RANK * c, (CP_RANK + 1) * c))
    want += list(range((2 * CP - 1 - CP_RANK) * c, (2 * CP - CP_RANK) * c))
    assert local["position_ids"][0].tolist() == want
    for name in ("tokens", "labels", "loss_mask", "position_ids"):
        assert torch.equal(gather_from_context_parallel(local[name], CP_GROUP, 1), batch[name])
    # megatron's RoPE picks the same positions on this CP rank
    rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, cp_group=CP_GROUP)
    assert torch.equal(rope(s), split(rope.get_emb(s)))


def check_gpt(cp_job):
    world = dist.get_world_size()
    cp = build(cp_job, VOCAB)
    # The same GPT without CP: full sequences on every rank (its own one-rank CP group).
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    pgs.cp = SELF_GROUP
    ref = build(parse_job(GPT_FLAGS, world_size=world), VOCAB,
                ModelOptions(model_kwargs={"pg_collection": pgs}))
    attention = [m.decoder.layers[0].self_attention.core_attention for m in (cp.gpt, ref.gpt)]
    assert [dist.get_world_size(a.cp_group) for a in attention] == [CP, 1]  # ring vs full
    for (name, p), p_ref in zip(cp.gpt.named_parameters(), ref.gpt.parameters()):
        assert torch.equal(p, p_ref), f"{name}: weights are not initialised by name"

    s = cp_job.model.seq_length
    data = torch.randint(0, VOCAB, (2, s + 1), generator=torch.Generator().manual_seed(3))
    full = micro_batches(data, 2)[0]
    ref_losses = ref.gpt(full["tokens"], full["position_ids"], None, labels=full["labels"])
    ref_losses.mean().backward()  # [b, s] per-token losses -> mean over all tokens
    # (DDP's hooks move each parameter's grad into its main_grad; no reduction runs here.)

    local = split_batch_for_context_parallel(full, CP_RANK, CP)
    with torch.no_grad():
        losses = cp.gpt(local["tokens"], local["position_ids"], None, labels=local["labels"])
    torch.testing.assert_close(gather_from_context_parallel(losses, CP_GROUP, 1),
                               ref_losses.detach(), **TOL)
    # A training forward/backward: token-sum loss per rank, finalize sums the grads and the
    # token counts over the CP group: main_grad = grad of the global per-token mean.
    cp.ddp.zero_grad_buffer()
    totals = loss_totals(forward_backward(cp.ddp, [local]))
    dist.all_reduce(totals, group=CP_GROUP)
    assert int(totals[1]) == ref_losses.numel()
    torch.testing.assert_close(totals[0] / totals[1], ref_losses.detach().mean(), **TOL)
    for (name, p), p_ref in zip(cp.gpt.named_parameters(), ref.gpt.parameters()):
        torch.testing.assert_close(p.main_grad, p_ref.main_grad, atol=1e-5, rtol=1e-4,
                                   msg=name)


def main():
    global CP, CP_RANK, CP_GROUP, SELF_GROUP
    world = int(os.environ["WORLD_SIZE"])
    cp_job = parse_job(GPT_FLAGS + ["--context-parallel-size", str(world)], world_size=world)
    initialize_megatron(cp_job)  # gloo group of all ranks, CP = world, seeds
    CP_GROUP = parallel_state.get_context_parallel_group()
    CP, CP_RANK = dist.get_world_size(CP_GROUP), dist.get_rank(CP_GROUP)
    SELF_GROUP = None
    for r in range(world):  # every rank must create every group, in the same order
        grp = dist.new_group([r])
        if r == dist.get_rank():
            SELF_GROUP = grp

    for heads, groups in ((4, 4), (4, 2), (4, 1)):
        for causal in (True, False):
            check_ring(heads, groups, causal)
    check_ring(4, 2, True, via_module=True)
    check_ring(2, 1, False, via_module=True)
    check_ring(4, 2, True, dtype=torch.bfloat16)
    check_split_roundtrip()
    check_gpt(cp_job)
    dist.barrier()
    if dist.get_rank() == 0:
        print("RING_OK", flush=True)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
