"""Tests of megatron_ext.batch_growth.topology (spec parsing, errors, detection)."""

import pytest

from megatron_ext.batch_growth import Topology, detect, parse_topology
from megatron_ext.batch_growth.topology import parse_nvidia_smi_topo, read_ib_rates_GBps


def test_full_spec():
    t = parse_topology("nodes=8,gpus_per_node=8,nvlink_GBps=600,ib_Gbps=8x200,gpu=A100-80GB")
    assert (t.num_nodes, t.gpus_per_node, t.num_gpus) == (8, 8, 64)
    assert t.intra_node_bw_GBps == 600 and t.inter_node_bw_GBps == 200  # 1600 Gb/s
    assert (t.gpu_tflops, t.gpu_memory_gb, t.gpu_name) == (312, 80, "a100-80gb")
    assert t.source == "spec"


def test_presets_and_overrides():
    h = parse_topology("h100-80gb")
    assert h.gpu_tflops == 989 and h.gpu_memory_gb == 80 and h.intra_node_bw_GBps == 900
    assert "defaults" in h.source
    t = parse_topology("gpu=h100, nodes=2, ib_GBps=100, tflops=700, memory_gb=94")
    assert (t.inter_node_bw_GBps, t.gpu_tflops, t.gpu_memory_gb) == (100, 700, 94)
    assert parse_topology("ib_Gbps=3200").inter_node_bw_GBps == 400
    assert parse_topology("gpu=NVIDIA A100-SXM4-40GB").gpu_memory_gb == 40


@pytest.mark.parametrize("spec, msg", [
    ("", "empty"),
    ("nodes=0", "positive integer"),
    ("nodes=two", "positive integer"),
    ("gpus_per_node=8,gpus_per_node=4", "given twice"),
    ("nvlink_GBps=fast", "not a number"),
    ("ib_Gbps=8x", "not a number"),
    ("colour=red", "unknown topology key"),
    ("gpu=tpu-v5", "unknown GPU"),
    ("banana", "unknown GPU"),
    ("tflops=-3", "must be > 0"),
])
def test_bad_specs(spec, msg):
    with pytest.raises(ValueError, match=msg):
        parse_topology(spec)


TOPO_A100 = """\
\tGPU0\tGPU1\tGPU2\tGPU3\tNIC0\tCPU Affinity
GPU0\t X \tNV12\tNV12\tNV12\tPXB\t0-63
GPU1\tNV12\t X \tNV12\tNV12\tPXB\t0-63
GPU2\tNV12\tNV12\t X \tNV12\tSYS\t64-127
GPU3\tNV12\tNV12\tNV12\t X \tSYS\t64-127
"""
TOPO_PCIE = "\tGPU0\tGPU1\nGPU0\t X \tPHB\nGPU1\tPHB\t X \n"


def test_parse_nvidia_smi_topo():
    assert parse_nvidia_smi_topo(TOPO_A100) == (4, 600.0)     # NVSwitch: 12 links x 50
    assert parse_nvidia_smi_topo(TOPO_PCIE) == (2, None)
    dgx1 = "\tGPU0\tGPU1\tGPU2\tGPU3\nGPU0\t X \tNV1\tNV2\tNV2\n"
    assert parse_nvidia_smi_topo(dgx1)[1] == 250.0            # direct links add up


def test_detect_with_fakes(tmp_path):
    for dev, rate in (("mlx5_0", "200 Gb/sec (4X HDR)"), ("mlx5_1", "200 Gb/sec (4X HDR)"),
                      ("mlx5_2", "100 Gb/sec (4X EDR)")):
        port = tmp_path / "sys/class/infiniband" / dev / "ports/1"
        port.mkdir(parents=True)
        (port / "rate").write_text(rate + "\n")
        (port / "state").write_text("1: DOWN\n" if dev == "mlx5_2" else "4: ACTIVE\n")
    assert read_ib_rates_GBps(str(tmp_path)) == 50.0

    def fake_run(cmd):
        return TOPO_A100 if "topo" in cmd else "NVIDIA H100 80GB HBM3\n" * 4

    t = detect(env={"LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "16"}, run=fake_run,
               sys_root=str(tmp_path))
    assert (t.num_nodes, t.gpus_per_node, t.gpu_name) == (4, 4, "h100-80gb")
    assert t.intra_node_bw_GBps == 600 and t.inter_node_bw_GBps == 50
    for item in ("LOCAL_WORLD_SIZE", "nvidia-smi topo", "WORLD_SIZE", "infiniband"):
        assert item in t.source


def test_detect_defaults(tmp_path):
    t = detect(env={}, run=lambda cmd: None, sys_root=str(tmp_path))
    assert t.num_gpus == 1 and t.source.startswith("defaults")
    assert isinstance(parse_topology("auto"), Topology)      # real machine, no GPU needed
