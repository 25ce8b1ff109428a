"""Cluster topology for the step-time model.

Main API: `Topology` (dataclass), `parse_topology(spec)` for `--topology` strings such as
`nodes=8,gpus_per_node=8,nvlink_GBps=600,ib_Gbps=8x200,gpu=A100-80GB`, `detect()`,
which reads LOCAL_WORLD_SIZE / WORLD_SIZE, `nvidia-smi topo -m` and
/sys/class/infiniband/*/ports/*/rate and records what it found in `Topology.source`, and
`predict_reduction_times(topology, grad_bytes, dp_size, tp_size)`: seconds of a flat and of a
hierarchical gradient all-reduce over the data-parallel group.

Units: `intra_node_bw_GBps` is the per-GPU NVLink figure as marketed (both directions
summed, e.g. 600 GB/s for A100); the cost model uses half of it per direction.
`inter_node_bw_GBps` is the node's aggregate NIC bandwidth in one direction (InfiniBand rates
are quoted per direction: 8 x 200 Gb/s = 200 GB/s).
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Mapping, Optional

# Dense bf16 tensor-core peak (TFLOP/s), memory (GB), NVLink per GPU (GB/s, both directions),
# NIC bandwidth per node of the matching DGX/HGX system (GB/s, one direction), HBM (GB/s).
GPU_PRESETS: Dict[str, Dict[str, float]] = {
    "v100-32gb": dict(tflops=125.0, memory_gb=32.0, nvlink_GBps=300.0,
                      ib_GBps=50.0, hbm_GBps=900.0),
    "a100-40gb": dict(tflops=312.0, memory_gb=40.0, nvlink_GBps=600.0,
                      ib_GBps=200.0, hbm_GBps=1555.0),
    "a100-80gb": dict(tflops=312.0, memory_gb=80.0, nvlink_GBps=600.0,
                      ib_GBps=200.0, hbm_GBps=2039.0),
    "h100-80gb": dict(tflops=989.0, memory_gb=80.0, nvlink_GBps=900.0,
                      ib_GBps=400.0, hbm_GBps=3350.0),
    "h200-141gb": dict(tflops=989.0, memory_gb=141.0, nvlink_GBps=900.0,
                      ib_GBps=400.0, hbm_GBps=4800.0),
}
_GPU_ALIASES = {"v100": "v100-32gb", "a100": "a100-80gb", "h100": "h100-80gb",
                "h200": "h200-141gb", "h200-140gb": "h200-141gb"}
DEFAULT_GPU = "a100-80gb"
NVLINK_GBPS_PER_LINK = 50.0  # NVLink 2/3/4: 25 GB/s per direction per link
PCIE_GBPS = 64.0             # PCIe gen4 x16, both directions, when there is no NVLink


@dataclass
class Topology:
    """A homogeneous GPU cluster."""

    num_nodes: int = 1
    """Number of nodes."""
    gpus_per_node: int = 8
    """GPUs per node."""
    intra_node_bw_GBps: float = 600.0
    """Per-GPU NVLink bandwidth, both directions summed (A100: 600, H100: 900)."""
    inter_node_bw_GBps: float = 200.0
    """Aggregate NIC bandwidth per node, one direction (8 x 200 Gb/s IB = 200 GB/s)."""
    gpu_tflops: float = 312.0
    """Dense bf16 peak of one GPU in TFLOP/s."""
    gpu_memory_gb: float = 80.0
    """Memory of one GPU in GiB (2**30 bytes; "80GB" cards hold 80 GiB)."""
    gpu_hbm_GBps: float = 2039.0
    """HBM bandwidth of one GPU in GB/s (prices the memory-bound optimizer step)."""
    gpu_name: str = DEFAULT_GPU
    """Preset or detected GPU name (informational)."""
    intra_node_latency_us: float = 3.0
    """Per-hop latency of a ring step over NVLink (rough NCCL figure)."""
    inter_node_latency_us: float = 8.0
    """Per-hop latency of a ring step over the network."""
    source: str = "manual"
    """What the numbers came from (spec, detected items, defaults)."""

    def __post_init__(self):
        if int(self.num_nodes) < 1 or int(self.gpus_per_node) < 1:
            raise ValueError(f"topology needs nodes >= 1 and gpus_per_node >= 1, got "
                             f"{self.num_nodes} x {self.gpus_per_node}")
        for name in ("intra_node_bw_GBps", "inter_node_bw_GBps", "gpu_tflops", "gpu_memory_gb",
                     "gpu_hbm_GBps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"topology {name} must be > 0, got {getattr(self, name)}")
        self.num_nodes, self.gpus_per_node = int(self.num_nodes), int(self.gpus_per_node)

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node

    def describe(self) -> str:
        return (f"{self.num_nodes} node(s) x {self.gpus_per_node} {self.gpu_name} "
                f"({self.gpu_tflops:g} TFLOP/s, {self.gpu_memory_gb:g} GiB), NVLink "
                f"{self.intra_node_bw_GBps:g} GB/s/GPU, network {self.inter_node_bw_GBps:g} "
                f"GB/s/node [source: {self.source}]")

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: Mapping) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def dp_layout(topology: Topology, dp_size: int, tp_size: int = 1):
    """(dp ranks per node, nodes spanned by one dp group). Megatron orders ranks tp-fastest,
    so a node holds gpus_per_node // tp ranks of each dp group."""
    per_node = max(1, min(dp_size, topology.gpus_per_node // tp_size))
    return per_node, -(-dp_size // per_node)


def predict_reduction_times(topology: Topology, grad_bytes: float, dp_size: int,
                            tp_size: int = 1) -> Dict[str, float]:
    """Predicted seconds of each gradient all-reduce algorithm over the dp group:
    {"none": 0} for dp = 1, {"flat": t} inside one node, else {"flat", "hierarchical"}.

    Ring all-reduce: 2(n-1)/n * bytes / bw + 2(n-1) * latency (Patarasuk & Yuan 2009).
    Every GPU of a node reduces at the same time, so each gets 1/gpus_per_node of the
    node's NIC bandwidth. `flat` runs one ring per local rank (NCCL-style multi-ring), so
    each GPU pushes 1/g of its traffic over the network and the rest over NVLink.
    `hierarchical`: reduce-scatter over NVLink, all-reduce of the 1/g shard across nodes,
    all-gather over NVLink (megatron-core's distributed optimizer with one instance per
    node: shard within an instance, all-reduce across instances).
    """
    t, n = topology, dp_size
    if n == 1:
        return {"none": 0.0}
    nvlink = t.intra_node_bw_GBps / 2 * 1e9          # one direction
    nic_per_gpu = t.inter_node_bw_GBps * 1e9 / t.gpus_per_node
    a_in, a_out = t.intra_node_latency_us * 1e-6, t.inter_node_latency_us * 1e-6
    g, nodes = dp_layout(t, n, tp_size)
    ring = 2 * (n - 1) / n
    if nodes == 1:
        return {"flat": ring * grad_bytes / nvlink + 2 * (n - 1) * a_in}
    flat = ring * grad_bytes * max(1 / (g * nic_per_gpu), (g - 1) / g / nvlink) \
        + 2 * (n - 1) * a_out
    hier = (2 * (g - 1) / g * grad_bytes / nvlink + 2 * (g - 1) * a_in
            + 2 * (nodes - 1) / nodes * (grad_bytes / g) / nic_per_gpu + 2 * (nodes - 1) * a_out)
    return {"flat": flat, "hierarchical": hier}


def gpu_preset(name: str) -> str:
    """Canonical preset key for a GPU name such as `A100-80GB` or `NVIDIA H100 80GB HBM3`."""
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    key = re.sub(r"^(nvidia-|tesla-)", "", key)
    if key in GPU_PRESETS:
        return key
    if key in _GPU_ALIASES:
        return _GPU_ALIASES[key]
    # Detected marketing names: "a100-sxm4-40gb", "h100-80gb-hbm3", "h200".
    for family in ("v100", "a100", "h100", "h200"):
        if family in key:
            mem = re.search(r"(\d+)gb", key)
            cand = f"{family}-{mem.group(1)}gb" if mem else _GPU_ALIASES[family]
            return cand if cand in GPU_PRESETS else _GPU_ALIASES[family]
    raise ValueError(f"unknown GPU {name!r}; presets: {', '.join(GPU_PRESETS)} (or drop "
                     "gpu= and give tflops=...,memory_gb=...,hbm_GBps=... explicitly)")


def _float(key: str, val: str) -> float:
    try:
        x = float(val)
    except ValueError:
        raise ValueError(f"topology key {key}={val!r} is not a number") from None
    if not x > 0:
        raise ValueError(f"topology key {key}={val!r} must be > 0")
    return x


def _int(key: str, val: str) -> int:
    if not re.fullmatch(r"\s*\d+\s*", val) or int(val) < 1:
        raise ValueError(f"topology key {key}={val!r} must be a positive integer")
    return int(val)


def _bandwidth_GBps(key: str, val: str, unit_bits: bool) -> float:
    """`8x200` (count x rate) or `1600`; Gb/s (bits) -> GB/s when `unit_bits`."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*([\d.]+)\s*", val)
    total = _int(key, m.group(1)) * _float(key, m.group(2)) if m else _float(key, val)
    return total / 8.0 if unit_bits else total


_KEYS = ("nodes", "gpus_per_node", "nvlink", "ib", "gpu", "tflops", "memory_gb", "hbm",
         "intra_latency_us", "inter_latency_us")
_ALIASES = {"num_nodes": "nodes", "gpus": "gpus_per_node", "intra": "nvlink", "inter": "ib",
            "mem_gb": "memory_gb", "memory": "memory_gb"}


def _split_key(raw: str):
    """('ib', True) for `ib_Gbps`; ('nvlink', False) for `nvlink_GBps`; bits vs bytes by case."""
    m = re.fullmatch(r"(.*?)_(G[bB])(ps|/s)", raw.strip())
    if m:
        return m.group(1).lower(), m.group(2) == "Gb"
    return raw.strip().lower(), None


def parse_topology(spec: str) -> Topology:
    """Parse a `--topology` spec; `auto` runs `detect()`.

    Keys: nodes, gpus_per_node, nvlink_GBps, ib_Gbps (or ib_GBps; value `8x200` or a total),
    gpu (preset: a100-80gb, h100-80gb, ...), tflops, memory_gb, hbm_GBps, intra_latency_us,
    inter_latency_us. A bare preset name counts as gpu=<name>. Later explicit keys override
    the GPU preset.
    """
    if spec is None or not spec.strip():
        raise ValueError("empty --topology; use `auto` or e.g. "
                         "`nodes=8,gpus_per_node=8,nvlink_GBps=600,ib_Gbps=8x200,gpu=A100-80GB`")
    if spec.strip().lower() == "auto":
        return detect()
    given: Dict[str, tuple] = {}
    for tok in (t.strip() for t in spec.split(",")):
        if not tok:
            continue
        if "=" not in tok:
            gpu_preset(tok)  # raises a clear error for unknown tokens
            raw, val = "gpu", tok
        else:
            raw, val = (s.strip() for s in tok.split("=", 1))
        key, bits = _split_key(raw)
        key = _ALIASES.get(key, key)
        if key not in _KEYS:
            raise ValueError(f"unknown topology key {raw!r}; valid keys: nodes, gpus_per_node, "
                             "nvlink_GBps, ib_Gbps|ib_GBps, gpu, tflops, memory_gb, hbm_GBps, "
                             "intra_latency_us, inter_latency_us")
        if key in given:
            raise ValueError(f"topology key {key!r} given twice in {spec!r}")
        given[key] = (val, bits, raw)

    gpu = gpu_preset(given["gpu"][0]) if "gpu" in given else DEFAULT_GPU
    p = GPU_PRESETS[gpu]
    kw = dict(gpu_name=gpu, gpu_tflops=p["tflops"], gpu_memory_gb=p["memory_gb"],
              intra_node_bw_GBps=p["nvlink_GBps"], inter_node_bw_GBps=p["ib_GBps"],
              gpu_hbm_GBps=p["hbm_GBps"])
    for key, (val, bits, raw) in given.items():
        if key == "nodes":
            kw["num_nodes"] = _int(raw, val)
        elif key == "gpus_per_node":
            kw["gpus_per_node"] = _int(raw, val)
        elif key == "nvlink":
            kw["intra_node_bw_GBps"] = _bandwidth_GBps(raw, val, bool(bits))
        elif key == "ib":
            # Network rates are usually quoted in bits; default to Gb/s when no unit is given.
            kw["inter_node_bw_GBps"] = _bandwidth_GBps(raw, val, bits is not False)
        elif key == "tflops":
            kw["gpu_tflops"] = _float(raw, val)
        elif key == "hbm":
            kw["gpu_hbm_GBps"] = _bandwidth_GBps(raw, val, bool(bits))
        elif key == "memory_gb":
            kw["gpu_memory_gb"] = _float(raw, val)
        elif key == "intra_latency_us":
            kw["intra_node_latency_us"] = _float(raw, val)
        elif key == "inter_latency_us":
            kw["inter_node_latency_us"] = _float(raw, val)
    defaulted = [k for k in ("gpu", "nodes", "gpus_per_node") if k not in given]
    src = "spec" + (f" (defaults for {', '.join(defaulted)})" if defaulted else "")
    return Topology(source=src, **kw)


# ----------------------------------------------------------------------------- detection
def _run(cmd) -> Optional[str]:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def parse_nvidia_smi_topo(text: str):
    """(num_gpus, per-GPU NVLink GB/s or None) from `nvidia-smi topo -m` output.

    With an NVSwitch every peer shows the same `NV#` (links per GPU, e.g. NV12 on A100), so
    the per-GPU bandwidth is #links x 50 GB/s; with direct links (DGX-1) peers show
    different counts and the links add up.
    """
    lines = text.splitlines()
    rows = [ln.split() for ln in lines if re.match(r"GPU\d+\s", ln)]  # not the header
    header = next((ln.split() for ln in lines if ln[:1].isspace() and "GPU0" in ln), [])
    n_gpu = max(len(rows), sum(1 for c in header if re.fullmatch(r"GPU\d+", c)))
    if not rows:
        return n_gpu, None
    peers = rows[0][1:1 + n_gpu]
    links = [int(c[2:]) for c in peers if re.fullmatch(r"NV\d+", c)]
    if not links:
        return n_gpu, None
    n_links = links[0] if (len(set(links)) == 1 and len(links) == n_gpu - 1) else sum(links)
    return n_gpu, n_links * NVLINK_GBPS_PER_LINK


def read_ib_rates_GBps(sys_root: str = "/") -> Optional[float]:
    """Sum of active port rates under /sys/class/infiniband (e.g. "200 Gb/sec (4X HDR)")."""
    total = 0.0
    pattern = os.path.join(sys_root, "sys/class/infiniband/*/ports/*/rate")
    for rate_file in sorted(glob.glob(pattern)):
        state_file = os.path.join(os.path.dirname(rate_file), "state")
        try:
            if os.path.exists(state_file) and "ACTIVE" not in open(state_file).read():
                continue
            m = re.search(r"([\d.]+)\s*Gb/sec", open(rate_file).read())
        except OSError:
            continue
        if m:
            total += float(m.group(1))
    return total / 8.0 if total > 0 else None


def detect(env: Optional[Mapping[str, str]] = None,
           run: Callable = _run, sys_root: str = "/") -> Topology:
    """Best-effort topology of the current job with safe defaults (A100-80GB DGX numbers).

    `env`, `run` (command -> stdout or None) and `sys_root` are injectable for tests.
    """
    env = os.environ if env is None else env
    found, kw = [], {}
    gpus = None
    if env.get("LOCAL_WORLD_SIZE"):
        gpus = int(env["LOCAL_WORLD_SIZE"])
        found.append("LOCAL_WORLD_SIZE")
    topo = run(["nvidia-smi", "topo", "-m"])
    if topo:
        n, nvlink = parse_nvidia_smi_topo(topo)
        if n and gpus is None:
            gpus = n
        kw["intra_node_bw_GBps"] = nvlink if nvlink else PCIE_GBPS
        found.append("nvidia-smi topo" + ("" if nvlink else " (no NVLink: PCIe)"))
    names = run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"])
    gpu = DEFAULT_GPU
    if names and names.strip():
        try:
            gpu = gpu_preset(names.strip().splitlines()[0])
            found.append("nvidia-smi name")
        except ValueError:
            pass
    p = GPU_PRESETS[gpu]
    kw.setdefault("intra_node_bw_GBps", p["nvlink_GBps"])
    gpus = gpus or 1
    nodes = 1
    if env.get("WORLD_SIZE"):
        world = int(env["WORLD_SIZE"])
        nodes = max(1, world // gpus)
        found.append("WORLD_SIZE")
    elif env.get("SLURM_JOB_NUM_NODES") or env.get("NNODES"):
        nodes = int(env.get("SLURM_JOB_NUM_NODES") or env["NNODES"])
        found.append("SLURM_JOB_NUM_NODES" if env.get("SLURM_JOB_NUM_NODES") else "NNODES")
    ib = read_ib_rates_GBps(sys_root)
    if ib:
        found.append("/sys/class/infiniband")
    src = "detected: " + ", ".join(found) if found else "defaults (nothing detected)"
    return Topology(num_nodes=nodes, gpus_per_node=gpus, gpu_name=gpu, gpu_tflops=p["tflops"],
                    gpu_memory_gb=p["memory_gb"], inter_node_bw_GBps=ib or p["ib_GBps"],
                    gpu_hbm_GBps=p["hbm_GBps"],
                    source=src, **kw)
