"""Tests of the pure-Python memory planner (no torch, no GPU)."""
import argparse
from dataclasses import replace

import pytest

from megatron_ext.memory_planner import (GIB, MemoryPlannerConfig, ModelShape, ParallelLayout,
                                         add_memory_planner_args, best_config, estimate_memory,
                                         longest_sequence, main, max_micro_batch_size)
from megatron_ext.memory_planner.estimate import (activation_bytes, largest_transient_bytes,
                                                  logits_bytes, stage_params)

NO_EXTRAS = dict(overhead_bytes=0, fragmentation=1.0, block_slack=False)


def small_model(**kw):
    d = dict(num_layers=8, hidden_size=2048, num_attention_heads=16, seq_length=4096,
             vocab_size=50304, untie_embeddings=False)
    d.update(kw)
    return ModelShape(**d)


# ----------------------------------------------------------------------------- formulas
def test_num_params_gpt2_small():
    m = ModelShape(12, 768, 12, 1024, 50257, untie_embeddings=False)
    h = 768
    per_layer = 12 * h * h + 13 * h  # QKV, proj, fc1, fc2 weights + biases + 2 LayerNorms
    assert m.layer_params() == per_layer
    assert m.num_params() == 12 * per_layer + 50304 * h + 2 * h  # padded vocab, final LN
    assert replace(m, untie_embeddings=True).num_params() == m.num_params() + 50304 * h
    # the same ModelShape as the cost model; no biases / RMSNorm drop those parameters
    lean = replace(m, add_bias_linear=False, normalization="RMSNorm")
    assert lean.layer_params() == 12 * h * h + 2 * h


def test_stage_params_cover_the_model():
    m = small_model(untie_embeddings=True, position_embedding_type="learned_absolute",
                    normalization="RMSNorm", add_bias_linear=False, swiglu=True)
    stages = [stage_params(m, ParallelLayout(pp=2), s) for s in (0, 1)]
    assert sum(stages) == m.num_params() == estimate_memory(m, ParallelLayout()).params_per_gpu
    assert stages[0] - stages[1] == 4096 * 2048 - 2048  # position table vs final RMSNorm
    # tied embeddings with pp > 1: the last stage keeps its own copy of the word embedding
    tied = replace(m, untie_embeddings=False)
    assert sum(stage_params(tied, ParallelLayout(pp=2), s) for s in (0, 1)) == m.num_params()


def test_static_memory_bytes_per_param():
    m, lay = small_model(), ParallelLayout()
    e = estimate_memory(m, lay)
    p = m.num_params()
    assert (e.weights, e.grads, e.optimizer) == (2 * p, 4 * p, 12 * p)
    e4 = estimate_memory(m, ParallelLayout(dp=4, distributed_optimizer=True))
    assert e4.optimizer == -(-12 * p // 4) and e4.grads == 4 * p
    assert estimate_memory(m, lay, include_optimizer=False).optimizer == 0
    # fp32 training: no separate master copy, only Adam moments
    assert estimate_memory(m, lay, dtype_bytes=4).optimizer == 8 * p


def test_korthikanti_no_recompute_local_attention():
    """Per layer: s*b*h*34 + a*s^2*b*7 (fp32 unfused softmax, megatron-core default)."""
    m = small_model()
    s, b, h, a, L = 4096, 2, 2048, 16, 8
    lay = ParallelLayout(attention="local", micro_batch_size=b)
    act = activation_bytes(m, lay)
    assert act["stored"] == L * (34 * s * b * h + 7 * a * s * s * b)
    # without dropout: no masks (2 sbh) and 6 bytes per score
    act = activation_bytes(replace(m, dropout=False), lay)
    assert act["stored"] == L * (32 * s * b * h + 6 * a * s * s * b)


def test_korthikanti_tensor_and_sequence_parallel():
    m, t = small_model(), 4
    s, b, h, a, L = 4096, 1, 2048, 16, 8
    no_sp = activation_bytes(m, ParallelLayout(tp=t, attention="local"))
    sp = activation_bytes(m, ParallelLayout(tp=t, sequence_parallel=True, attention="local"))
    # Korthikanti Table 2: sbh(10 + 24/t + 5as/(ht)) without SP, sbh(34/t + ...) with SP
    assert no_sp["stored"] == L * (10 * s * b * h + 24 * s * b * h // t + 7 * a * s * s * b // t)
    assert sp["stored"] == L * (34 * s * b * h // t + 7 * a * s * s * b // t)


def test_flash_drops_score_term_and_selective_equals_flash():
    m = small_model()
    s, b, h, a, L = 4096, 1, 2048, 16, 8
    flash = activation_bytes(m, ParallelLayout(attention="flash"))
    assert flash["stored"] == L * (34 * s * b * h + 4 * a * s * b)  # + fp32 log-sum-exp
    sel_local = activation_bytes(m, ParallelLayout(attention="local",
                                                   recompute_granularity="selective"))
    assert sel_local["stored"] == L * 34 * s * b * h


def test_gqa_and_swiglu_terms():
    s, h, f = 4096, 2048, 5632
    base = activation_bytes(small_model(), ParallelLayout())["stored"]
    gqa = activation_bytes(small_model(num_query_groups=4), ParallelLayout())["stored"]
    assert base - gqa == 8 * 4 * s * (h - h * 4 // 16)  # K and V narrower
    gl = activation_bytes(small_model(ffn_hidden_size=f), ParallelLayout())["stored"]
    sw = activation_bytes(small_model(ffn_hidden_size=f, swiglu=True), ParallelLayout())["stored"]
    assert sw - gl == 8 * 2 * s * f  # SwiGLU keeps both halves of the 2f-wide fc1 output
    # head dim d = 64 instead of h/a = 128: Q, K, V and the attention output are half as wide
    narrow = activation_bytes(small_model(kv_channels=64), ParallelLayout())["stored"]
    assert base - narrow == 8 * (2 + 4 + 2) * s * (h // 2)


def test_full_recompute_uniform_and_block():
    m = small_model()
    sbh, L = 4096 * 2048, 8
    full_layer = activation_bytes(m, ParallelLayout(attention="flash"))["stored"] // L
    uni = activation_bytes(m, ParallelLayout(recompute_granularity="full"))
    assert uni["stored"] == L * 2 * sbh and uni["transient"] == full_layer
    uni4 = activation_bytes(m, ParallelLayout(recompute_granularity="full",
                                              recompute_num_layers=4))
    assert uni4["stored"] == 2 * 2 * sbh and uni4["transient"] == 4 * full_layer
    blk = activation_bytes(m, ParallelLayout(recompute_granularity="full",
                                             recompute_method="block", recompute_num_layers=3))
    assert blk["stored"] == 3 * 2 * sbh + 5 * full_layer
    sp = activation_bytes(m, ParallelLayout(tp=2, sequence_parallel=True,
                                            recompute_granularity="full"))
    assert sp["stored"] == L * 2 * sbh // 2


def test_pipeline_first_stage_holds_pp_microbatches():
    m = small_model(num_layers=16)
    lay = ParallelLayout(pp=4, num_microbatches=8, recompute_granularity="full")
    per_mb = 4 * 2 * 4096 * 2048  # 4 layers/stage, layer inputs only
    for stage, in_flight in enumerate([4, 3, 2, 1]):
        act = activation_bytes(m, lay, stage)
        assert act["in_flight"] == in_flight and act["stored"] == in_flight * per_mb
    assert activation_bytes(m, replace(lay, num_microbatches=2), 0)["in_flight"] == 2
    # logits only on the last stage: 6 bytes (fp32 softmax + bf16 logits) per [s, b, V/t]
    assert logits_bytes(m, lay, 0) == 0
    assert logits_bytes(m, lay, 3) == 6 * 4096 * 50304


def test_context_parallel_splits_sequence_and_optimizer():
    m = small_model(seq_length=16384)
    one = estimate_memory(m, ParallelLayout(dp=2, distributed_optimizer=True))
    cp2 = estimate_memory(m, ParallelLayout(dp=2, cp=2, distributed_optimizer=True))
    assert cp2.optimizer == -(-one.optimizer * 2 // 4)  # sharded over dp * cp = 4 ranks
    assert activation_bytes(m, ParallelLayout(cp=2))["stored"] * 2 == pytest.approx(
        activation_bytes(m, ParallelLayout())["stored"], rel=1e-6)
    assert cp2.weights == one.weights


# ----------------------------------------------------------------------------- monotonicity
def test_more_recompute_less_memory():
    for attention in ("local", "flash"):
        m, lay = small_model(seq_length=8192), ParallelLayout(attention=attention)
        none = estimate_memory(m, lay).total
        sel = estimate_memory(m, replace(lay, recompute_granularity="selective")).total
        full = estimate_memory(m, replace(lay, recompute_granularity="full")).total
        assert full < sel <= none
    # flash never stores the scores: selective only saves the tiny fp32 log-sum-exp
    assert none - sel < 0.001 * none


def test_more_tp_less_memory_and_longer_seq_more_memory():
    m = small_model()
    totals = [estimate_memory(m, ParallelLayout(tp=t, sequence_parallel=True)).total
              for t in (1, 2, 4, 8)]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4
    seqs = [estimate_memory(m.with_seq_length(s), ParallelLayout()).total
            for s in (1024, 4096, 16384)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3


# ----------------------------------------------------------------------------- anchors
def test_h100_anchors_local_spec():
    """Sanity anchors measured on one H100 with megatron-core's local spec (0.54B params,
    8 layers, h 2048, 16 heads, s 4096, mbs 1, bf16): 20.8 / 8.6 / 6.9 GiB peak for
    none / selective / full recompute. Vocab unknown: 50304, tied (Megatron's default).

    These peaks are below the 18 bytes/param of steady-state training (0.51B x 18 B = 8.5 GiB
    > 6.9 GiB), so they were evidently taken as allocated memory of forward/backward with
    bf16 weights + fp32 main grads and no Adam state (first iteration / fwd-bwd benchmark):
    we compare that part of the model (include_optimizer=False, no overhead/fragmentation).
    The brief allows 25%; the model lands within 3%. Real target: 10% against a GPU
    measurement of full training when a GPU is lent.
    """
    m = small_model()
    for gran, measured in ((None, 20.8), ("selective", 8.6), ("full", 6.9)):
        lay = ParallelLayout(attention="local", recompute_granularity=gran)
        pred = estimate_memory(m, lay, include_optimizer=False, **NO_EXTRAS).total / GIB
        assert pred == pytest.approx(measured, rel=0.10), (gran, pred)


def test_h100_anchor_16k_full_recompute_local_oom():
    """s=16384 with full recompute and local attention OOMed on an 80 GB H100. One layer's
    materialised scores need ~14 bytes/score (stored 7 + workspace 7), ~56 GiB, so the
    allocated peak of full training is ~70 GiB; what makes it fail is the caching allocator:
    the 8 GiB bf16 and 16 GiB fp32 score blocks cannot be merged, modelled as one largest
    transient block (16 GiB) of slack. With that the planner predicts the OOM, and 15k as
    the longest local-attention sequence."""
    m = small_model(seq_length=16384)
    lay = ParallelLayout(attention="local", recompute_granularity="full")
    est = estimate_memory(m, lay, block_slack=True)
    assert not est.fits(79.6 * GIB)
    assert est.fragmentation == largest_transient_bytes(m, lay, 0) == 4 * 16 * 16384 ** 2
    allocated = estimate_memory(m, lay, block_slack=False)
    assert 0.8 * 79.6 * GIB < allocated.total < 79.6 * GIB
    assert est.details["transient"] > 0.9 * est.activations  # one layer's scores dominate
    assert 8192 <= longest_sequence(small_model(), lay, 79.6 * GIB, block_slack=True) < 16384
    # with flash attention the same run needs only a few GiB of activations
    flash = estimate_memory(m, replace(lay, attention="flash"))
    assert flash.activations < 3 * GIB and flash.total < 20 * GIB


def test_block_slack_follows_expandable_segments(monkeypatch):
    m, lay = small_model(seq_length=8192), ParallelLayout(attention="local")
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    assert estimate_memory(m, lay) == estimate_memory(m, lay, block_slack=True)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    assert estimate_memory(m, lay) == estimate_memory(m, lay, block_slack=False)
    assert (estimate_memory(m, lay, block_slack=True).total
            > estimate_memory(m, lay, block_slack=False).total)


# ----------------------------------------------------------------------------- searches
def test_max_micro_batch_size_consistent():
    m, lay, cap = small_model(), ParallelLayout(recompute_granularity="full"), 40 * GIB
    b = max_micro_batch_size(m, lay, cap)
    assert 1 <= b < 64
    assert estimate_memory(m, replace(lay, micro_batch_size=b)).total <= cap
    assert estimate_memory(m, replace(lay, micro_batch_size=b + 1)).total > cap
    assert max_micro_batch_size(m, lay, 1 * GIB) == 0
    assert max_micro_batch_size(m, lay, 10_000 * GIB, limit=64) == 64


def test_longest_sequence_consistent():
    m, lay, cap = small_model(), ParallelLayout(recompute_granularity="full"), 40 * GIB
    s = longest_sequence(m, lay, cap)
    assert s % 1024 == 0 and s > 4096
    assert estimate_memory(m.with_seq_length(s), lay).total <= cap
    assert estimate_memory(m.with_seq_length(s + 1024), lay).total > cap
    assert longest_sequence(m, lay, 1 * GIB) == 0
    # more tensor parallelism (with SP) allows a longer sequence
    tp2 = longest_sequence(m, replace(lay, tp=2, sequence_parallel=True), cap)
    assert tp2 > s


def test_best_config_ranking():
    m = small_model(num_layers=16, seq_length=32768)
    ranked = best_config(m, world_size=8, gpu_memory_bytes=80 * GIB, global_batch_size=16)
    assert ranked
    costs = [c for _, _, c in ranked]
    assert costs == sorted(costs)
    for lay, est, _ in ranked:
        assert est.total <= 80 * GIB and lay.world_size == 8
        assert lay.dp * lay.micro_batch_size * lay.num_microbatches == 16
    # nothing beats a fitting layout without recompute or pipeline bubble
    assert ranked[0][0].recompute_granularity is None and ranked[0][0].pp == 1
    # explicit candidates are respected and filtered by memory
    cands = [ParallelLayout(dp=8, distributed_optimizer=True, num_microbatches=2,
                            recompute_granularity=g) for g in (None, "full")]
    got = best_config(m, 8, 30 * GIB, 16, candidates=cands)
    assert [lay.recompute_granularity for lay, _, _ in got] == ["full"]


# ----------------------------------------------------------------------------- config & CLI
def test_planner_config_and_validation():
    p = add_memory_planner_args(argparse.ArgumentParser())
    cfg = MemoryPlannerConfig.from_args(p.parse_args([]))
    assert cfg == MemoryPlannerConfig() and cfg.gpu_memory_bytes == 80 * GIB
    cfg = MemoryPlannerConfig.from_args(p.parse_args(
        ["--plan-memory", "--gpu-memory-gb", "40", "--memory-overhead-gb", "2",
         "--memory-fragmentation", "1.1"]))
    assert cfg.plan_memory and cfg.estimate_kwargs() == {"overhead_bytes": 2 * GIB,
                                                         "fragmentation": 1.1}
    for kw in (dict(gpu_memory_gb=0), dict(memory_overhead_gb=-1),
               dict(memory_fragmentation=0.9)):
        with pytest.raises(ValueError):
            MemoryPlannerConfig(**kw)


@pytest.mark.parametrize("kw", [dict(tp=0), dict(recompute_granularity="all"),
                                dict(recompute_method="chunk"), dict(attention="sdpa"),
                                dict(cp=2, attention="local"), dict(recompute_num_layers=0)])
def test_layout_validation(kw):
    with pytest.raises(ValueError):
        ParallelLayout(**kw)


def test_model_validation():
    with pytest.raises(ValueError):
        ModelShape(8, 2050, 16, 4096, 50304)  # h not divisible by heads
    with pytest.raises(ValueError):
        small_model(num_query_groups=5)


def test_cli_main_runs(capsys):
    rc = main(["--num-layers", "16", "--hidden-size", "2048", "--num-attention-heads", "16",
               "--seq-length", "65536", "--gpu-memory-gb", "80", "--world-size", "8",
               "--global-batch-size", "16", "--recompute-granularity", "full"])
    out = capsys.readouterr().out
    assert rc == 0
    for needle in ("recompute=none", "recompute=selective", "recompute=full", "(requested)",
                   "longest sequence", "fastest fitting layouts", "total"):
        assert needle in out, needle


def test_cli_model_flags(capsys):
    base = ["--num-layers", "8", "--hidden-size", "1024", "--num-attention-heads", "8",
            "--seq-length", "8192", "--world-size", "1"]
    assert main(base + ["--swiglu", "--num-query-groups", "2", "--disable-bias-linear",
                        "--normalization", "RMSNorm", "--ffn-hidden-size", "2816"]) == 0
    out = capsys.readouterr().out
    lean = ModelShape(8, 1024, 8, 8192, 50304, ffn_hidden_size=2816, num_query_groups=2,
                      swiglu=True, add_bias_linear=False, normalization="RMSNorm",
                      untie_embeddings=False)
    assert f"{lean.num_params() / 1e9:.3f}B params" in out and "heads=8/2 groups" in out
    with pytest.raises(SystemExit):  # a bad shape is a usage error naming the fix
        main(base + ["--num-query-groups", "3"])


def test_cli_module_entry_point():
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "megatron_ext.memory_planner", "--num-layers", "8",
                        "--hidden-size", "1024", "--num-attention-heads", "8",
                        "--seq-length", "8192", "--attention-backend", "local"],
                       capture_output=True, text=True, check=True)
    assert "attention=local" in r.stdout and "GiB" in r.stdout
    code = ("import sys, megatron_ext.memory_planner; "
            "assert 'torch' not in sys.modules and 'megatron.core' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- one report
ANCHOR_4K = ["--num-layers", "8", "--hidden-size", "2048", "--num-attention-heads", "16",
             "--seq-length", "4096", "--attention-backend", "local"]


def _requested_and_ranked(out):
    """(GiB of the "(requested)" recompute line, GiB of the ranking's requested row)."""
    req = next(ln for ln in out.splitlines() if ln.startswith("[") and "(requested)" in ln)
    row = next((ln for ln in out.splitlines() if "(requested, #" in ln), None)
    gib = float(req.split(": ")[-1].split(" GiB")[0])
    return gib, None if row is None else float(row.split("peak")[1].split("GiB")[0])


def test_ranking_keeps_requested_flags_and_layout(capsys):
    """Regression (issue 15): at 4k with --attention-backend local the requested layout
    printed 28.71 GiB and the same layout in the ranking 13.57 GiB (priced as flash)."""
    main(ANCHOR_4K + ["--hidden-dropout", "0.1"])  # Megatron-LM's dropout: the numbers
    out = capsys.readouterr().out
    req, ranked = _requested_and_ranked(out)
    assert req == ranked == pytest.approx(28.71, abs=0.01)
    rows = [ln for ln in out.splitlines() if ln.startswith("  cost")]
    assert rows and all("attention=local" in ln for ln in rows)
    # full recompute with block/4 is priced with block/4 in the ranking too
    main(ANCHOR_4K + ["--recompute-granularity", "full", "--recompute-method", "block",
                      "--recompute-num-layers", "4", "--swiglu", "--num-query-groups", "4"])
    out = capsys.readouterr().out
    req, ranked = _requested_and_ranked(out)
    assert req == ranked
    assert "recompute=full/block/4" in out and "full/uniform" not in out


def test_ranking_says_when_requested_does_not_fit(capsys):
    main(ANCHOR_4K[:7] + ["16384", "--attention-backend", "local", "--hidden-dropout", "0.1",
                          "--recompute-granularity", "full", "--gpu-memory-gb", "79.6",
                          "--world-size", "8"])
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "the requested layout does not fit" in out
    assert "(requested, #" not in out and "  cost" in out  # tp > 1 layouts fit


@pytest.mark.parametrize("flags", [ANCHOR_4K, ANCHOR_4K[:7] + [
    "16384", "--attention-backend", "local", "--recompute-granularity", "full",
    "--hidden-dropout", "0.1", "--gpu-memory-gb", "79.6"]])
def test_plan_memory_and_cli_agree(flags, capsys):
    """`--plan-memory` prints the CLI's report for the same flags (4k/16k anchors)."""
    from megatron_ext.training.job import parse_job
    from megatron_ext.training.memory_report import print_memory_plan

    job = parse_job(flags + ["--max-position-embeddings", flags[7], "--mock-data",
                             "--micro-batch-size", "1", "--plan-memory"], world_size=1)
    print_memory_plan(job, vocab_size=50304)
    training = capsys.readouterr().out
    main(flags)
    cli = capsys.readouterr().out
    assert cli.strip() in training
    assert "(requested)" in cli and ("fastest fitting layouts" in cli or "no layout" in cli)
