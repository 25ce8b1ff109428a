"""Global-batch planner: micro-batch split, gradient-reduction algorithm and step-time model.

Main API: `BatchPlanner(model_flops_per_sample, param_count, topology, dp_size, ...)` with
`plan(global_batch) -> Plan` and `valid_global_batches(lo, hi)`. The planner is
model-agnostic: for a GPT, take both numbers from `megatron_ext.cost_model.ModelShape`
(`flops_per_sample(tp)`, `num_params(tp)`).

Step time (per optimizer step) =
    compute  = flops_per_sample * B / (num_gpus * peak * mfu)
  + bubble   = compute * (pp - 1) / num_microbatches          (1F1B, Narayanan et al. 2021)
  + exposed  = max(0, t_reduce - overlap_fraction * t_backward(one micro-batch))
  + optimizer = optimizer_bytes_per_param * params_per_gpu / HBM bandwidth
because the data-parallel gradient reduction overlaps with the last micro-batch's backward
(Megatron --overlap-grad-reduce), and the Adam update is memory-bound. Larger global
batches at a fixed micro-batch add accumulation steps, so these per-step costs are
amortised: throughput grows with B.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from .topology import Topology


@dataclass
class Plan:
    """How one global batch is run and what it is predicted to cost."""

    global_batch: int
    micro_batch_size: int
    num_microbatches: int
    """Gradient-accumulation steps per optimizer step (per data-parallel rank)."""
    dp_size: int
    reduction: str
    """`flat` ring all-reduce, `hierarchical` (intra RS, inter AR, intra AG) or `none`."""
    predicted_step_time_s: float
    predicted_samples_per_s: float
    predicted_tokens_per_s: Optional[float]
    """None when the planner has no seq_length."""
    breakdown: Dict[str, float] = field(default_factory=dict)


class BatchPlanner:
    """Splits a global batch into micro-batches and predicts the step time."""

    def __init__(self, model_flops_per_sample: float, param_count: int, topology: Topology,
                 dp_size: int, tp_size: int = 1, pp_size: int = 1,
                 max_micro_batch_size: int = 1, seq_length: Optional[int] = None,
                 grad_dtype_bytes: int = 4, mfu_assumed: float = 0.45,
                 overlap_fraction: float = 1.0, min_micro_batch_size: int = 1,
                 optimizer_bytes_per_param: float = 30.0, distributed_optimizer: bool = False):
        """`optimizer_bytes_per_param`: HBM traffic of one mixed-precision Adam update
        (read fp32 param, grad, m, v = 16 B; write param, m, v = 12 B; bf16 copy 2 B).
        `distributed_optimizer` shards that update over dp (Megatron
        --use-distributed-optimizer; ZeRO-1, Rajbhandari et al. 2020)."""
        if dp_size < 1 or tp_size < 1 or pp_size < 1:
            raise ValueError("dp_size, tp_size and pp_size must be >= 1")
        if dp_size * tp_size * pp_size > topology.num_gpus:
            raise ValueError(f"dp*tp*pp = {dp_size * tp_size * pp_size} exceeds the "
                             f"{topology.num_gpus} GPUs of the topology; fix --topology or the "
                             "parallel sizes")
        if not 1 <= min_micro_batch_size <= max_micro_batch_size:
            raise ValueError(f"need 1 <= min_micro_batch_size ({min_micro_batch_size}) <= "
                             f"max_micro_batch_size ({max_micro_batch_size}); a max of 0 means "
                             "one sample does not fit: add tp/pp or recomputation")
        if not 0.0 < mfu_assumed <= 1.0 or not 0.0 <= overlap_fraction <= 1.0:
            raise ValueError("mfu_assumed must be in (0, 1] and overlap_fraction in [0, 1]")
        self.model_flops_per_sample = float(model_flops_per_sample)
        self.param_count = int(param_count)
        self.topology = topology
        self.dp_size, self.tp_size, self.pp_size = dp_size, tp_size, pp_size
        self.max_micro_batch_size = int(max_micro_batch_size)
        self.min_micro_batch_size = int(min_micro_batch_size)
        self.seq_length = seq_length
        self.grad_dtype_bytes = grad_dtype_bytes
        self.mfu_assumed = mfu_assumed
        self.overlap_fraction = overlap_fraction
        self.optimizer_bytes_per_param = optimizer_bytes_per_param
        self.distributed_optimizer = distributed_optimizer
        self._cache: Dict[int, Plan] = {}

    # ------------------------------------------------------------------ validity
    @property
    def num_gpus(self) -> int:
        return self.dp_size * self.tp_size * self.pp_size

    def micro_batch_for(self, global_batch: int) -> Optional[int]:
        """Largest micro-batch <= max that divides B/dp and leaves >= pp micro-batches."""
        if global_batch < 1 or global_batch % self.dp_size:
            return None
        per_rank = global_batch // self.dp_size
        for mbs in range(min(self.max_micro_batch_size, per_rank),
                         self.min_micro_batch_size - 1, -1):
            # 1F1B needs at least pp micro-batches in flight to fill the pipeline.
            if per_rank % mbs == 0 and per_rank // mbs >= self.pp_size:
                return mbs
        return None

    def is_valid(self, global_batch: int) -> bool:
        return self.micro_batch_for(global_batch) is not None

    def next_valid(self, lo: int, limit: int = 10 ** 7) -> Optional[int]:
        """Smallest valid global batch >= lo (None if none up to `limit`)."""
        b = max(self.dp_size, -(-max(lo, 1) // self.dp_size) * self.dp_size)
        while b <= limit:
            if self.is_valid(b):
                return b
            b += self.dp_size
        return None

    def valid_global_batches(self, lo: int, hi: int) -> List[int]:
        """All global batches in [lo, hi] this layout can run (multiples of dp)."""
        start = max(self.dp_size, -(-max(lo, 1) // self.dp_size) * self.dp_size)
        return [b for b in range(start, hi + 1, self.dp_size) if self.is_valid(b)]

    # ------------------------------------------------------------------ communication
    def grad_bytes(self) -> float:
        """Gradient bytes each GPU reduces: its tp*pp shard of the parameters."""
        return self.param_count / (self.tp_size * self.pp_size) * self.grad_dtype_bytes

    def _dp_layout(self):
        """(dp ranks per node, nodes spanned by one dp group). Megatron orders ranks
        tp-fastest, so a node holds gpus_per_node // tp ranks of each dp group."""
        per_node = max(1, min(self.dp_size, self.topology.gpus_per_node // self.tp_size))
        return per_node, -(-self.dp_size // per_node)

    def reduction_times(self) -> Dict[str, float]:
        """Predicted seconds of each gradient all-reduce algorithm over the dp group.

        Ring all-reduce: 2(n-1)/n * bytes / bw + 2(n-1) * latency (Patarasuk & Yuan 2009).
        Every GPU of a node reduces at the same time, so each gets 1/gpus_per_node of the
        node's NIC bandwidth. `flat` runs one ring per local rank (NCCL-style multi-ring),
        so each GPU pushes 1/g of its traffic over the network and the rest over NVLink.
        `hierarchical`: reduce-scatter over NVLink, all-reduce of the 1/g shard across
        nodes, all-gather over NVLink.
        """
        t = self.topology
        n = self.dp_size
        if n == 1:
            return {"none": 0.0}
        nbytes = self.grad_bytes()
        nvlink = t.intra_node_bw_GBps / 2 * 1e9          # one direction
        nic_per_gpu = t.inter_node_bw_GBps * 1e9 / t.gpus_per_node
        a_in, a_out = t.intra_node_latency_us * 1e-6, t.inter_node_latency_us * 1e-6
        g, nodes = self._dp_layout()
        ring = 2 * (n - 1) / n
        if nodes == 1:
            return {"flat": ring * nbytes / nvlink + 2 * (n - 1) * a_in}
        flat = ring * nbytes * max(1 / (g * nic_per_gpu), (g - 1) / g / nvlink) \
            + 2 * (n - 1) * a_out
        hier = (2 * (g - 1) / g * nbytes / nvlink + 2 * (g - 1) * a_in
                + 2 * (nodes - 1) / nodes * (nbytes / g) / nic_per_gpu + 2 * (nodes - 1) * a_out)
        return {"flat": flat, "hierarchical": hier}

    # ------------------------------------------------------------------ plan
    def plan(self, global_batch: int) -> Plan:
        """Plan for `global_batch`; ValueError (with a fix) if the layout cannot run it."""
        if global_batch in self._cache:
            return self._cache[global_batch]
        mbs = self.micro_batch_for(global_batch)
        if mbs is None:
            raise ValueError(
                f"global batch {global_batch} cannot run with dp={self.dp_size}, "
                f"pp={self.pp_size}, micro-batch in [{self.min_micro_batch_size}, "
                f"{self.max_micro_batch_size}]: it must be a multiple of dp and give >= pp "
                f"micro-batches per rank; nearest valid: "
                f"{self._nearest_valid(global_batch)}")
        m = global_batch // (mbs * self.dp_size)
        t = self.topology
        compute = (self.model_flops_per_sample * global_batch
                   / (self.num_gpus * t.gpu_tflops * 1e12 * self.mfu_assumed))
        bubble = compute * (self.pp_size - 1) / m
        times = self.reduction_times()
        reduction = min(times, key=times.get)
        comm = times[reduction]
        # Backward is ~2/3 of forward+backward; the last micro-batch's backward hides comm.
        backward_one_mb = compute / m * 2.0 / 3.0
        exposed = max(0.0, comm - self.overlap_fraction * backward_one_mb)
        shard = self.tp_size * self.pp_size * (self.dp_size if self.distributed_optimizer else 1)
        optimizer = (self.param_count / shard * self.optimizer_bytes_per_param
                     / (t.gpu_hbm_GBps * 1e9))
        step = compute + bubble + exposed + optimizer
        samples_per_s = global_batch / step
        tokens = samples_per_s * self.seq_length if self.seq_length else None
        breakdown = dict(compute_s=compute, bubble_s=bubble, comm_s=comm, exposed_comm_s=exposed,
                         optimizer_s=optimizer,
                         grad_bytes=self.grad_bytes(),
                         **{f"comm_{k}_s": v for k, v in times.items()})
        p = Plan(global_batch=global_batch, micro_batch_size=mbs, num_microbatches=m,
                 dp_size=self.dp_size, reduction=reduction, predicted_step_time_s=step,
                 predicted_samples_per_s=samples_per_s, predicted_tokens_per_s=tokens,
                 breakdown=breakdown)
        self._cache[global_batch] = p
        return p

    def _nearest_valid(self, b: int) -> str:
        below = self.valid_global_batches(max(1, b - 64 * self.dp_size), b)
        above = self.valid_global_batches(b, b + 64 * self.dp_size)
        return ", ".join(str(x) for x in (below[-1:] + above[:1])) or "none nearby"

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return dict(model_flops_per_sample=self.model_flops_per_sample,
                    param_count=self.param_count, topology=self.topology.state_dict(),
                    dp_size=self.dp_size, tp_size=self.tp_size, pp_size=self.pp_size,
                    max_micro_batch_size=self.max_micro_batch_size,
                    min_micro_batch_size=self.min_micro_batch_size,
                    seq_length=self.seq_length, grad_dtype_bytes=self.grad_dtype_bytes,
                    mfu_assumed=self.mfu_assumed, overlap_fraction=self.overlap_fraction,
                    optimizer_bytes_per_param=self.optimizer_bytes_per_param,
                    distributed_optimizer=self.distributed_optimizer)

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.topology.load_state_dict(state.pop("topology"))
        for k, v in state.items():
            setattr(self, k, v)
        self._cache.clear()


def plan_as_dict(p: Plan) -> dict:
    return asdict(p)
