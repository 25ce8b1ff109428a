"""GNS route selection (megatron_ext/gns/routes.py) and the three dW + per-sample-norm routes.

Every route's dW, db and per-sample ‖dW_i‖², ‖db_i‖² are checked against an fp64 loop over
single samples (fp32 and bf16, odd shapes, both layouts, dW accumulated into an fp32
main_grad over two micro-batches). "fused" runs the Triton kernel in the interpreter
(conftest sets TRITON_INTERPRET=1 without CUDA). The decision logic runs on CPU: the
analytic rule, forcing, the cache file; the CUDA timing itself is stubbed here.
"""
import json

import pytest
import torch
from gns_helpers import fp64_sample_truth as _fp64_loop
from gns_helpers import make_wgrad_inputs as _make

from megatron_ext.gns import routes
from megatron_ext.gns.config import GNS_ROUTE_CHOICES, GNSConfig
from megatron_ext.kernels import LinearWithSampleNorms, wgrad_sample_norms_route

SHAPES = [(37, 3, 45, 33), (5, 1, 16, 48), (17, 2, 20, 7)]  # (s, b, d_in, d_out)


@pytest.mark.parametrize("route", routes.ROUTES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["sbh", "bsh"])
def test_route_matches_fp64_loop_with_accumulation(route, shape, dtype, layout):
    main_grad = torch.full((shape[3], shape[2]), 0.5)  # fp32, holding earlier grads
    want_dw = main_grad.double().clone()
    for mb in range(2):  # two micro-batches accumulate into main_grad
        x, dy = _make(*shape, dtype, layout, seed=mb)
        res = wgrad_sample_norms_route(route, x, dy, layout, main_grad=main_grad,
                                       compute_bias=True)
        dw, nw, db, nb = _fp64_loop(x, dy, layout)
        want_dw += dw
        assert res.grad_weight is main_grad
        assert res.sq_norms_weight.dtype == torch.float32 and res.sq_norms_weight.shape == (shape[1],)
        torch.testing.assert_close(res.sq_norms_weight.double(), nw, rtol=1e-4, atol=0)
        torch.testing.assert_close(res.sq_norms_bias.double(), nb, rtol=1e-4, atol=0)
        torch.testing.assert_close(res.grad_bias.double(), db, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(main_grad.double(), want_dw, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("route", routes.ROUTES)
def test_route_without_main_grad_returns_input_dtype(route):
    x, dy = _make(9, 2, 12, 10, torch.bfloat16, "sbh")
    res = wgrad_sample_norms_route(route, x, dy, "sbh")
    dw, nw, _, _ = _fp64_loop(x, dy, "sbh")
    assert res.grad_weight.dtype == torch.bfloat16 and res.grad_bias is None
    torch.testing.assert_close(res.grad_weight.double(), dw, rtol=2e-2, atol=2e-2 * dw.abs().max().item())
    torch.testing.assert_close(res.sq_norms_weight.double(), nw, rtol=1e-4, atol=0)


def test_routes_give_the_same_linear_backward():
    """LinearWithSampleNorms: dx, dW, db and the reported norms agree across routes."""
    x0, dy = _make(11, 3, 14, 9, torch.float32, "sbh", seed=4)
    w0, b0 = torch.randn(9, 14), torch.randn(9)
    out = {}
    for route in routes.ROUTES:
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        got = []
        LinearWithSampleNorms.apply(x, w, b, got.append, "sbh", False, None, None, route).backward(dy)
        out[route] = (x.grad, w.grad, b.grad, got[0])
    for route in ("ghost", "batched"):
        for a, f in zip(out[route], out["fused"]):
            torch.testing.assert_close(a, f, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="route must be one of"):
        wgrad_sample_norms_route("nope", x0, dy)


# ----------------------------------------------------------------------------- decision
def test_analytic_rule():
    # short sequences in wide layers: the Gram matrices are cheap -> ghost
    assert routes.analytic_route(128, 4096, 4096)[0] == "ghost"
    # long sequences: fused; ghost is refused when 2T^2 > d_in*d_out (memory rule)
    route, extra = routes.analytic_route(4096, 4096, 4096)
    assert route == "fused" and extra["ghost"] > extra["fused"]
    assert routes.analytic_route(64, 32, 32)[1]["ghost"] == float("inf")
    assert routes.analytic_route(64, 32, 32)[1]["batched"] == 1.0
    # tie-break order is ROUTES
    assert routes.ROUTES == ("fused", "ghost", "batched") == GNS_ROUTE_CHOICES[1:]


def test_select_route_cpu_forced_and_cached():
    c = routes.select_route(16, 32, 96, 2, torch.float32, "cpu")
    assert c.route == "fused" and c.times_ms == {} and "CPU" in c.reason and "nothing timed" in c.reason
    assert routes.select_route(16, 32, 96, 2, torch.float32, "cpu") is c  # in-process cache
    assert routes.select_route(128, 4096, 4096, 2, torch.bfloat16, "cpu").route == "ghost"
    f = routes.select_route(16, 32, 96, 2, torch.float32, "cpu", forced="batched")
    assert (f.route, f.times_ms) == ("batched", {}) and "forced" in f.reason
    assert routes.select_route(16, 32, 96, 2, torch.float32, "cpu", forced="auto").route == "fused"
    with pytest.raises(ValueError, match="--gns-route"):
        routes.select_route(16, 32, 96, 2, torch.float32, "cpu", forced="cublas")


def test_measured_choice_is_cached_in_a_file(tmp_path, monkeypatch):
    """The CUDA path with its timing stubbed: fastest wins, JSON cache, reloaded later."""
    monkeypatch.setenv("MEGATRON_EXT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(routes, "_CHOICES", {})
    monkeypatch.setattr(routes, "_FILE_LOADED", False)
    monkeypatch.setattr(routes, "_can_measure", lambda device: True)
    monkeypatch.setattr(routes, "_device_name", lambda device: "Fake GPU")
    calls = []

    def fake_measure(t, d_in, d_out, b, dtype, device):
        calls.append((t, d_in, d_out, b))
        return {"fused": 1.3, "ghost": 0.9, "batched": 2.0}

    monkeypatch.setattr(routes, "measure_routes", fake_measure)
    c = routes.select_route(512, 1024, 3072, 4, torch.bfloat16, "cuda")
    assert c.route == "ghost" and c.times_ms["fused"] == 1.3 and "measured" in c.reason
    assert routes.select_route(512, 1024, 3072, 4, torch.bfloat16, "cuda") is c and len(calls) == 1
    saved = json.loads((tmp_path / "gns_routes.json").read_text())
    (key, entry), = saved.items()
    assert "T512:b4:3072x1024:bfloat16:Fake GPU" in key and entry["route"] == "ghost"
    # a new process: the file answers, nothing is timed again
    monkeypatch.setattr(routes, "_CHOICES", {})
    monkeypatch.setattr(routes, "_FILE_LOADED", False)
    again = routes.select_route(512, 1024, 3072, 4, torch.bfloat16, "cuda")
    assert again.route == "ghost" and again.times_ms == entry["times_ms"] and len(calls) == 1
    # measure=False on CUDA: the analytic rule, said so
    rule = routes.select_route(512, 1024, 3072, 4, torch.bfloat16, "cuda", measure=False)
    assert rule.times_ms == {} and "measurement off" in rule.reason


def test_linear_route_reads_the_flag_and_gathers_sp_tokens(monkeypatch):
    class Rec:
        config = GNSConfig(gns=True, gns_route="ghost")

    x, w = torch.zeros(8, 2, 32), torch.zeros(96, 32)
    assert routes.linear_route(Rec(), x, w, False, None) == "ghost"
    Rec.config = GNSConfig(gns=True)  # auto
    seen = []
    monkeypatch.setattr(routes, "select_route", lambda *a, **k: seen.append(a) or routes.RouteChoice("batched"))
    monkeypatch.setattr("torch.distributed.get_world_size", lambda group: 4)
    assert routes.linear_route(Rec(), x, w, True, object()) == "batched"
    assert seen[0][:4] == (32, 32, 96, 2)  # SP: the kernel sees s = 4 * 8 gathered tokens


def test_config_flag():
    assert GNSConfig().gns_route == "auto"
    with pytest.raises(ValueError, match="--gns-route"):
        GNSConfig(gns_route="cublas")
