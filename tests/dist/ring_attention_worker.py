"""torchrun worker for tests/test_ring_attention.py: CP ring attention == full causal attention.

Run: ``torchrun --nproc_per_node 2 tests/dist/ring_attention_worker.py`` (CPU, gloo). Checks,
on a context-parallel group of all ranks:

1. ``ring_attention`` output and q/k/v grads equal full attention on the gathered sequence
   (MHA/GQA, causal/no_mask, fp32 and bf16), also through ``SDPACoreAttention``'s CP path;
2. ``split_batch_for_context_parallel`` round-trips through ``gather_from_context_parallel``,
   and megatron's RoPE slice (``get_pos_emb_on_this_cp_rank``) is the same split;
3. a tiny GPTModel with CP gives the same per-token losses and (after summing over the CP
   group) the same parameter gradients as the same weights without CP.
Prints ``RING_OK`` on success.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_ext import cpu_backend

cpu_backend.enable_cpu_backend(force=True)  # CPU + gloo even on a GPU machine

from megatron.core import parallel_state  # noqa: E402
from megatron.core.models.common.embeddings.rotary_pos_embedding import (  # noqa: E402
    RotaryEmbedding,
)
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.process_groups_config import ProcessGroupCollection  # noqa: E402
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from megatron_ext.model.attention import SDPACoreAttention  # noqa: E402
from megatron_ext.model.layer_spec import get_gpt_block_spec, get_gpt_layer_spec  # noqa: E402
from megatron_ext.model.ring_attention import (  # noqa: E402
    gather_from_context_parallel,
    ring_attention,
    split_batch_for_context_parallel,
)

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


def tiny_gpt(cp_size, pg_collection=None):
    cfg = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
        context_parallel_size=cp_size, use_cpu_initialization=True, attention_dropout=0.0,
        hidden_dropout=0.0, masked_softmax_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
    )
    spec = get_gpt_block_spec(cfg, get_gpt_layer_spec(SDPACoreAttention))
    return GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=64,
                    max_sequence_length=32, position_embedding_type="rope",
                    pg_collection=pg_collection)


def check_gpt():
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    cp_model = tiny_gpt(CP)
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    pgs.cp = SELF_GROUP
    ref_model = tiny_gpt(1, pgs)
    ref_model.load_state_dict(cp_model.state_dict())

    s = 16
    data = torch.randint(0, 64, (2, s + 1), generator=torch.Generator().manual_seed(3))
    full = {"tokens": data[:, :-1], "labels": data[:, 1:],
            "position_ids": torch.arange(s).expand(2, -1)}
    ref_losses = ref_model(full["tokens"], full["position_ids"], None, labels=full["labels"])
    ref_losses.mean().backward()  # [b, s] per-token losses -> mean over all tokens

    local = split_batch_for_context_parallel(full, CP_RANK, CP)
    losses = cp_model(local["tokens"], local["position_ids"], None, labels=local["labels"])
    torch.testing.assert_close(gather_from_context_parallel(losses.detach(), CP_GROUP, 1),
                               ref_losses.detach(), **TOL)
    # global token mean = sum of local sums / global token count; grads summed over CP
    (losses.sum() / ref_losses.numel()).backward()
    for (name, p), p_ref in zip(cp_model.named_parameters(), ref_model.parameters()):
        grad = p.grad.clone()
        dist.all_reduce(grad, group=CP_GROUP)
        torch.testing.assert_close(grad, p_ref.grad, atol=1e-5, rtol=1e-4, msg=name)


def main():
    global CP, CP_RANK, CP_GROUP, SELF_GROUP
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    parallel_state.initialize_model_parallel(context_parallel_size=world)
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
    check_gpt()
    dist.barrier()
    if dist.get_rank() == 0:
        print("RING_OK", flush=True)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
