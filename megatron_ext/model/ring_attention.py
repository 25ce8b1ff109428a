"""Context parallelism without Transformer Engine: ring attention with the load-balanced split.

Main API: :func:`ring_attention` (called by ``FlashCoreAttention`` when the context-parallel
group has more than one rank), :func:`split_batch_for_context_parallel` (training loop) and
:func:`gather_from_context_parallel` / :func:`merge_context_parallel_chunks` (the inverse).

Sequence split (Megatron-LM / TE "load-balanced causal" split): the sequence is cut into
``2 * cp`` chunks and CP rank ``i`` holds chunks ``i`` and ``2 * cp - 1 - i``, so that under a
causal mask every rank does the same amount of work. megatron-core's RoPE slices its
frequencies the same way (``rope_utils.get_pos_emb_on_this_cp_rank``).

Ring attention (Liu et al. 2023, https://arxiv.org/abs/2310.01889; blockwise softmax of
Milakov & Gimelshein 2018 / FlashAttention, https://arxiv.org/abs/2205.14135): K/V blocks travel
around the CP ring with P2P; each rank attends its queries to the visiting block, and partial
outputs are merged with their log-sum-exp (lse). With the load-balanced split every step is one
of three cases (``r`` = this rank, ``j`` = owner of the visiting K/V):

* ``j == r``: causal attention of the local 2 chunks on themselves;
* ``j <  r``: all local queries attend the first K/V chunk (chunk ``j``) fully;
* ``j >  r``: the second local query chunk attends both K/V chunks fully.

Backward: the same ring again, recomputing each block's probabilities from the saved global
lse (as FlashAttention's backward does); dK/dV accumulators travel with the K/V blocks and reach
their owner after ``cp`` hops. Tensors inside are laid out ``[b, ng, r, s, d]`` for queries
(``r = np / ng`` query heads per K/V group: GQA without repeating K/V) and ``[b, ng, s, d]``
for keys/values. Block attention uses flash-attn's forward (which returns the lse) when asked
and possible, else a pure-PyTorch fp32 kernel chunked over query rows; the backward always uses
the PyTorch kernel. Communication works with gloo (CPU) and nccl (GPU).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

_MAX_SCORE_ELEMENTS = 1 << 26  # fp32 scores materialised at once by the PyTorch kernel (256 MiB)


# ----------------------------------------------------------------------------- sequence split
def _cp_chunk_ids(cp_rank: int, cp_size: int) -> tuple[int, int]:
    return cp_rank, 2 * cp_size - 1 - cp_rank


def split_batch_for_context_parallel(
    batch: dict, cp_rank: int, cp_size: int, seq_dim: int = 1
) -> dict:
    """This CP rank's part of every tensor in ``batch``: chunks ``cp_rank`` and ``2cp-1-cp_rank``.

    ``tokens``/``labels``/``loss_mask``/``position_ids`` ``[b, s]`` become ``[b, s / cp]``.
    Non-tensors and ``None`` pass through. The sequence length must divide by ``2 * cp_size``.
    """
    if cp_size == 1:
        return dict(batch)
    out = {}
    for name, t in batch.items():
        if not isinstance(t, torch.Tensor):
            out[name] = t
            continue
        s = t.size(seq_dim)
        if s % (2 * cp_size):
            raise ValueError(
                f"split_batch_for_context_parallel: {name} has sequence length {s}, which must "
                f"be divisible by 2 * context_parallel_size = {2 * cp_size}; pad the sequence."
            )
        idx = torch.tensor(_cp_chunk_ids(cp_rank, cp_size), device=t.device)
        shape = t.shape
        t = t.view(*shape[:seq_dim], 2 * cp_size, s // (2 * cp_size), *shape[seq_dim + 1 :])
        t = t.index_select(seq_dim, idx)
        out[name] = t.reshape(*shape[:seq_dim], s // cp_size, *shape[seq_dim + 1 :])
    return out


def merge_context_parallel_chunks(pieces: list, seq_dim: int = 1) -> torch.Tensor:
    """Inverse of the split: ``pieces[i]`` is CP rank ``i``'s local tensor; returns the full one."""
    cp = len(pieces)
    chunks: list = [None] * (2 * cp)
    for rank, piece in enumerate(pieces):
        first, second = piece.chunk(2, dim=seq_dim)
        a, b = _cp_chunk_ids(rank, cp)
        chunks[a], chunks[b] = first, second
    return torch.cat(chunks, dim=seq_dim)


def gather_from_context_parallel(t: torch.Tensor, group, seq_dim: int = 1) -> torch.Tensor:
    """All-gather a CP-split tensor over ``group`` and restore sequence order (no autograd)."""
    pieces = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, t.contiguous(), group=group)
    return merge_context_parallel_chunks(pieces, seq_dim)


# ----------------------------------------------------------------------- block attention kernels
def _row_chunk(q: torch.Tensor, sk: int) -> int:
    b, g, r, sq, _ = q.shape
    return max(1, min(sq, _MAX_SCORE_ELEMENTS // max(1, b * g * r * sk)))


def _scores(q_c, k_t, scale, causal, row0):
    """Scaled scores of a row chunk ``[b, g, r, rows, sk]``; causal mask aligned top-left."""
    s = torch.matmul(q_c, k_t) * scale
    if causal:
        rows, sk = s.shape[-2], s.shape[-1]
        row_ids = torch.arange(row0, row0 + rows, device=s.device).unsqueeze(-1)
        s = s.masked_fill(torch.arange(sk, device=s.device) > row_ids, float("-inf"))
    return s


def block_attention_forward(q, k, v, scale: float, causal: bool):
    """One block in fp32: q ``[b, g, r, sq, d]``, k/v ``[b, g, sk, d]`` -> (out, lse).

    ``lse`` ``[b, g, r, sq]`` is the natural-log sum of exp of the scaled scores of each row.
    """
    qf, kf, vf = q.float(), k.float().unsqueeze(2), v.float().unsqueeze(2)
    k_t = kf.transpose(-1, -2)  # [b, g, 1, d, sk]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    step = _row_chunk(q, k.size(-2))
    for row0 in range(0, q.size(-2), step):
        rows = slice(row0, row0 + step)
        s = _scores(qf[..., rows, :], k_t, scale, causal, row0)
        lse_c = torch.logsumexp(s, dim=-1)
        out[..., rows, :] = torch.matmul(torch.exp(s - lse_c.unsqueeze(-1)), vf)
        lse[..., rows] = lse_c
    return out, lse


def block_attention_backward(q, k, v, dout, lse, delta, scale: float, causal: bool):
    """Gradients of one block given the *global* row lse and ``delta = rowsum(dout * out)``.

    P = exp(scale q k^T - lse); dV = P^T dO; dS = P * (dO V^T - delta); dQ = scale dS K;
    dK = scale dS^T Q (FlashAttention-2 backward, https://arxiv.org/abs/2307.08691). GQA: dK/dV
    sum over the ``r`` query heads of each group. Returns fp32 (dq, dk, dv).
    """
    qf, kf, vf = q.float(), k.float().unsqueeze(2), v.float().unsqueeze(2)
    k_t, v_t = kf.transpose(-1, -2), vf.transpose(-1, -2)
    dof = dout.float()
    dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    step = _row_chunk(q, k.size(-2))
    for row0 in range(0, q.size(-2), step):
        rows = slice(row0, row0 + step)
        q_c, do_c = qf[..., rows, :], dof[..., rows, :]
        p = torch.exp(_scores(q_c, k_t, scale, causal, row0) - lse[..., rows].unsqueeze(-1))
        dv += torch.matmul(p.transpose(-1, -2), do_c).sum(2)
        ds = p * (torch.matmul(do_c, v_t) - delta[..., rows].unsqueeze(-1))
        dq[..., rows, :] = torch.matmul(ds, kf) * scale
        dk += torch.matmul(ds.transpose(-1, -2), q_c).sum(2) * scale
    return dq, dk, dv


def _flash_block_forward(q, k, v, scale: float, causal: bool):
    """flash-attn forward of one block; returns (out fp32 ``[b, g, r, sq, d]``, lse fp32)."""
    from flash_attn import flash_attn_func

    b, g, r, sq, d = q.shape
    out, lse, _ = flash_attn_func(
        q.flatten(1, 2).transpose(1, 2),  # [b, sq, np, d]
        k.transpose(1, 2),  # [b, sk, ng, d]: flash-attn handles GQA natively
        v.transpose(1, 2),
        softmax_scale=scale,
        causal=causal,
        return_attn_probs=True,
    )
    out = out.transpose(1, 2).reshape(b, g, r, sq, d).float()
    return out, lse[..., :sq].reshape(b, g, r, sq).float()


def _block_forward(q, k, v, scale, causal, use_flash):
    if use_flash and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return _flash_block_forward(q, k, v, scale, causal)
    return block_attention_forward(q, k, v, scale, causal)


def _merge(out, lse, blk_out, blk_lse, rows: slice):
    """out[rows] <- softmax-weighted merge of two partial results (log-sum-exp trick)."""
    old_out, old_lse = out[..., rows, :], lse[..., rows]
    new_lse = torch.logaddexp(old_lse, blk_lse)
    out[..., rows, :] = (
        torch.exp(old_lse - new_lse).unsqueeze(-1) * old_out
        + torch.exp(blk_lse - new_lse).unsqueeze(-1) * blk_out
    )
    lse[..., rows] = new_lse


# ------------------------------------------------------------------------------------- the ring
def _step_plan(rank: int, src: int, s_local: int, causal: bool):
    """(query rows, kv rows, causal) of the block computed when holding ``src``'s K/V."""
    half = s_local // 2
    every = slice(0, s_local)
    if not causal:
        return every, every, False
    if src == rank:
        return every, every, True
    if src < rank:
        return every, slice(0, half), False
    return slice(half, s_local), every, False


def _ring_exchange(send: torch.Tensor, group, rank: int, size: int):
    """Start sending ``send`` to the next CP rank and receiving the previous rank's tensor."""
    recv = torch.empty_like(send)
    nxt = dist.get_global_rank(group, (rank + 1) % size)
    prv = dist.get_global_rank(group, (rank - 1) % size)
    ops = [
        dist.P2POp(dist.isend, send, nxt, group),
        dist.P2POp(dist.irecv, recv, prv, group),
    ]
    return recv, dist.batch_isend_irecv(ops)


def _wait(reqs):
    for req in reqs:
        req.wait()


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, causal, group, use_flash):
        # q [b, g, r, s, d]; k, v [b, g, s, d] (contiguous, this rank's 2 chunks)
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        s_local = q.size(-2)
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])  # [2, b, g, s, d]: one message per hop
        for step in range(size):
            if step < size - 1:  # prefetch the next block while computing this one
                nxt_kv, reqs = _ring_exchange(kv, group, rank, size)
            src = (rank - step) % size
            qr, kr, blk_causal = _step_plan(rank, src, s_local, causal)
            blk_out, blk_lse = _block_forward(
                q[..., qr, :], kv[0][..., kr, :], kv[1][..., kr, :], scale, blk_causal, use_flash
            )
            _merge(out, lse, blk_out, blk_lse, qr)
            if step < size - 1:
                _wait(reqs)
                kv = nxt_kv
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.causal, ctx.group = scale, causal, group
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, scale, causal = ctx.group, ctx.scale, ctx.causal
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        s_local = q.size(-2)
        dout = dout.contiguous()
        delta = (dout.float() * out.float()).sum(-1)  # [b, g, r, s]
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)  # travels with kv
        for step in range(size):
            if step < size - 1:
                nxt_kv, kv_reqs = _ring_exchange(kv, group, rank, size)
            src = (rank - step) % size
            qr, kr, blk_causal = _step_plan(rank, src, s_local, causal)
            dq_b, dk_b, dv_b = block_attention_backward(
                q[..., qr, :], kv[0][..., kr, :], kv[1][..., kr, :], dout[..., qr, :],
                lse[..., qr], delta[..., qr], scale, blk_causal,
            )
            dq[..., qr, :] += dq_b
            dkv[0][..., kr, :] += dk_b
            dkv[1][..., kr, :] += dv_b
            if step < size - 1:
                _wait(kv_reqs)  # before the dK/dV hop, so no two messages to a peer overlap
                kv = nxt_kv
            # dK/dV of ``src``'s block move on with it; after ``size`` hops they are home.
            dkv, dkv_reqs = _ring_exchange(dkv, group, rank, size)
            _wait(dkv_reqs)
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None


def ring_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    softmax_scale: float,
    cp_group,
    causal: bool = True,
    use_flash: bool = False,
) -> torch.Tensor:
    """Attention over a sequence split across ``cp_group`` (load-balanced split).

    query ``[s_local, b, np, hn]``, key/value ``[s_local, b, ng, hn]`` (``np % ng == 0``) ->
    ``[s_local, b, np * hn]``. ``use_flash`` computes block forwards with flash-attn (CUDA,
    fp16/bf16). No dropout.
    """
    s, b, np_, hn = query.shape
    ng = key.size(2)
    if np_ % ng:
        raise ValueError(f"ring_attention: {np_} query heads not divisible by {ng} K/V groups")
    if causal and s % 2:
        raise ValueError("ring_attention: the local sequence must be 2 equal chunks (even length)")
    q = query.permute(1, 2, 0, 3).reshape(b, ng, np_ // ng, s, hn).contiguous()
    k = key.permute(1, 2, 0, 3).contiguous()  # [b, ng, s, hn]
    v = value.permute(1, 2, 0, 3).contiguous()
    out = _RingAttention.apply(q, k, v, softmax_scale, causal, cp_group, use_flash)
    return out.reshape(b, np_, s, hn).permute(2, 0, 1, 3).reshape(s, b, np_ * hn)


def context_parallel_group_size(group: Optional[object]) -> int:
    """World size of a CP group (1 when None or torch.distributed is not initialised)."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)
