"""Context parallelism: ring attention (2 CPU ranks via torchrun) and the load-balanced split."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from launch import free_port
from megatron_ext.model.ring_attention import (
    block_attention_backward,
    block_attention_forward,
    merge_context_parallel_chunks,
    split_batch_for_context_parallel,
)

WORKER = Path(__file__).parent / "dist" / "ring_attention_worker.py"


def test_split_is_load_balanced_and_merges_back():
    batch = {"tokens": torch.arange(16).view(1, 16), "meta": "x"}
    pieces = [split_batch_for_context_parallel(batch, r, 2)["tokens"] for r in range(2)]
    assert pieces[0].tolist() == [[0, 1, 2, 3, 12, 13, 14, 15]]
    assert pieces[1].tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    assert split_batch_for_context_parallel(batch, 0, 2)["meta"] == "x"
    assert torch.equal(merge_context_parallel_chunks(pieces, 1), batch["tokens"])
    with pytest.raises(ValueError, match="divisible by 2"):
        split_batch_for_context_parallel({"t": torch.zeros(1, 10)}, 0, 4)


@pytest.mark.parametrize("causal", [True, False])
def test_block_kernels_match_autograd(causal, monkeypatch):
    # tiny row chunks so that the chunked loop and its causal row offsets are exercised
    monkeypatch.setattr("megatron_ext.model.ring_attention._MAX_SCORE_ELEMENTS", 64)
    g = torch.Generator().manual_seed(0)
    b, ng, r, s, d = 2, 2, 3, 10, 8
    q = torch.randn(b, ng, r, s, d, generator=g, requires_grad=True)
    k = torch.randn(b, ng, s, d, generator=g, requires_grad=True)
    v = torch.randn(b, ng, s, d, generator=g, requires_grad=True)
    dout = torch.randn(b, ng, r, s, d, generator=g)
    ref = F.scaled_dot_product_attention(
        q.flatten(1, 2), k, v, is_causal=causal, scale=0.3, enable_gqa=True
    ).view(b, ng, r, s, d)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    out, lse = block_attention_forward(q.detach(), k.detach(), v.detach(), 0.3, causal)
    torch.testing.assert_close(out, ref.detach(), atol=1e-5, rtol=1e-5)
    delta = (dout * out).sum(-1)
    grads = block_attention_backward(q, k, v, dout, lse, delta, 0.3, causal)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_ring_attention_cp2_matches_full_attention():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(WORKER),
    ]
    proc = subprocess.run(
        cmd, cwd=WORKER.parents[2], env=env, capture_output=True, text=True, timeout=120
    )
    log = proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.returncode == 0 and "RING_OK" in proc.stdout, log
