"""GNS per-sample norms == brute force for every norm/bias placement --gns can meet.

Each case runs tests/dist/gns_worker.py (one process, TP=1, 2 micro-batches of 2 samples)
and compares the tracker's |g_i|^2 and |G_B|^2 with one Megatron backward per sample:
--qk-layernorm (norms on [s, b, heads, head_dim]: issue 13's crash), LayerNorm vs RMSNorm,
linear biases on/off, SwiGLU, grouped-query attention, untied embeddings measured
(--gns-include-embedding), and each forced dW route (fused / ghost / batched), which must
all give the same numbers.
"""
import pytest

from gns_helpers import assert_close, run_worker

CASES = {
    # LayerNorm (also on q/k) + linear biases (skip_bias_add into SwiGLU) + GQA (4 heads,
    # 2 groups) + untied embedding and output layer measured; ghost-norm route
    "qk_layernorm_biases_swiglu_gqa_untied": ["--qk-layernorm", "--swiglu",
                                              "--num-query-groups", "2", "--include-embedding",
                                              "--gns-route", "ghost"],
    # RMSNorm (also on q/k), no linear biases, GeLU, full multi-head; batched-product route
    "qk_rmsnorm_no_bias_gelu": ["--qk-layernorm", "--normalization", "RMSNorm",
                                "--disable-bias-linear", "--gns-route", "batched"],
}
# The fused route (auto's choice on these CPU shapes) is what every other GNS test runs.


@pytest.mark.parametrize("case", sorted(CASES))
def test_placement_matches_brute_force(case, tmp_path):
    r = run_worker(tmp_path, 1, "--steps", "1", *CASES[case])
    assert_close(r["per_sample_gns"], r["per_sample_brute"])
    assert_close(r["batch_gns"], r["batch_brute"])
