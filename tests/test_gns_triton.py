"""GNS layers with the Triton kernels (wgrad + per-sample norm grads) in Triton's interpreter.

The other GNS tests run the kernels' PyTorch reference (the CPU training path); here the
fused kernels themselves run inside a real Megatron TP=2 + SP step (gathered inputs,
non-contiguous grads, tied embedding, q/k layernorm on [s, b, heads, d]) and must match the
brute force.
"""
from gns_helpers import assert_close, run_worker


def test_tp2_sequence_parallel_tied_embedding_with_triton_kernels(tmp_path):
    r = run_worker(tmp_path, 2, "--tp", "2", "--steps", "0", "--include-embedding", "--tie",
                   "--qk-layernorm", triton_interpret=True)
    assert r["kernel_backend"] == "triton-interpret" and r["norm_grads_triton"]
    assert_close(r["per_sample_gns"], r["per_sample_brute"])
    assert_close(r["batch_gns"], r["batch_brute"])
