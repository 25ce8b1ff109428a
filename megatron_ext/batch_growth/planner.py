"""Global-batch planner: micro-batch split, gradient-reduction algorithm and step-time model.

Main API: `BatchPlanner(model_flops_per_sample, param_count, topology, dp_size, ...)` with
`plan(global_batch) -> Plan`, `split_options(B)`, `split_efficiency(B)`,
`efficient_batches(lo, hi)`, `valid_global_batches(lo, hi)`, `observe(mbs, m, seconds)`
(measured step times refine the model), `predict_step_time(mbs, m)` and
`step_time_by_reduction(B)`. The planner is model-agnostic: for a GPT, take both numbers
from `megatron_ext.cost_model.ModelShape` (`flops_per_sample(tp)`, `num_params(tp)`).

Step time (per optimizer step, one model replica of tp*pp GPUs) =
    compute   = m * k * (b*s + t_half)       m micro-batches of b sequences (step_time.py:
                                              k = s/token at mfu_assumed, t_half = fixed
                                              cost per micro-batch in tokens)
  + bubble    = compute * (pp - 1) / m        (1F1B, Narayanan et al. 2021)
  + exposed   = max(0, t_reduce - overlap_fraction * t_backward(one micro-batch))
  + optimizer = optimizer_bytes_per_param * params_per_gpu / HBM bandwidth
because the data-parallel gradient reduction overlaps with the last micro-batch's backward
(Megatron --overlap-grad-reduce), and the Adam update is memory-bound. For a global batch B
the planner runs the split (b, m) with B = b * m * dp, b <= max_micro_batch_size (from the
memory planner) and m >= pp that minimises this time; `split_efficiency(B)` says how close
that split is to an unconstrained one, and `efficient_batches` (what the controller may grow
to) leaves out batches whose only splits are slow (a prime per-rank batch: micro-batch 1).
The split is chosen from the prior model only, so every rank chooses the same one; measured
step times (`observe`) refine the predicted times (k, t_half), not the split.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

from .step_time import DEFAULT_OVERHEAD_TOKENS, StepTimeEstimator
from .topology import Topology, dp_layout, predict_reduction_times

NO_MODEL = "no step-time model for this device"


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
    """NaN when there is no step-time model for this device and nothing was measured yet."""
    predicted_samples_per_s: float
    predicted_tokens_per_s: Optional[float]
    """None when the planner has no seq_length."""
    breakdown: Dict[str, float] = field(default_factory=dict)
    split_efficiency: float = 1.0
    """Predicted time of an unconstrained split / time of this split (prior model)."""
    step_time_source: str = "model"
    """`model` (topology prior), `fitted to N measured split(s)`, or NO_MODEL."""


class BatchPlanner:
    """Splits a global batch into micro-batches and predicts the step time."""

    def __init__(self, model_flops_per_sample: float, param_count: int, topology: Topology,
                 dp_size: int, tp_size: int = 1, pp_size: int = 1,
                 max_micro_batch_size: int = 1, seq_length: Optional[int] = None,
                 grad_dtype_bytes: int = 4, mfu_assumed: float = 0.45,
                 overlap_fraction: float = 1.0, min_micro_batch_size: int = 1,
                 optimizer_bytes_per_param: float = 30.0, distributed_optimizer: bool = False,
                 overhead_tokens: float = DEFAULT_OVERHEAD_TOKENS, device_model: bool = True,
                 min_split_efficiency: float = 0.95):
        """`optimizer_bytes_per_param`: HBM traffic of one mixed-precision Adam update
        (read fp32 param, grad, m, v = 16 B; write param, m, v = 12 B; bf16 copy 2 B).
        `distributed_optimizer` shards that update over dp (Megatron
        --use-distributed-optimizer; ZeRO-1, Rajbhandari et al. 2020).
        `overhead_tokens`: prior t_half of the per-micro-batch efficiency (step_time.py).
        `device_model`: False where the topology's GPU model does not describe the device
        (a CPU run): no predicted time until a step was measured (`observe`).
        `min_split_efficiency`: batches whose best split is slower than this fraction of an
        unconstrained split are left out of `valid_global_batches` (0: keep all)."""
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
        if not 0.0 <= min_split_efficiency <= 1.0:
            raise ValueError(f"min_split_efficiency must be in [0, 1], got {min_split_efficiency}")
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
        # Without a sequence length "tokens" are samples and the per-micro-batch cost is off.
        self.overhead_tokens = float(overhead_tokens) if seq_length else 0.0
        self.device_model = device_model
        self.min_split_efficiency = min_split_efficiency
        self._reset()

    def _reset(self) -> None:
        prior = self._prior_per_token_s() if self.device_model else None
        self.step_time = StepTimeEstimator(prior, self.overhead_tokens)
        self._cache: Dict[int, Plan] = {}
        self._reduction: Optional[Dict[str, float]] = None
        self._split_cache: Dict[int, Tuple[Optional[Tuple[int, int]], float]] = {}

    # ------------------------------------------------------------------ step-time model
    @property
    def num_gpus(self) -> int:
        return self.dp_size * self.tp_size * self.pp_size

    @property
    def tokens_per_sample(self) -> int:
        return self.seq_length or 1

    def _prior_per_token_s(self) -> float:
        """k: seconds per token on one replica (tp*pp GPUs) at the asymptotic MFU."""
        t = self.topology
        return (self.model_flops_per_sample / self.tokens_per_sample
                / (self.tp_size * self.pp_size * t.gpu_tflops * 1e12 * self.mfu_assumed))

    def _parts(self, mbs: int, m: float, k: float, t_half: float,
               device: bool) -> Dict[str, float]:
        """Step-time terms of `m` micro-batches of `mbs` (m may be fractional: the ideal)."""
        compute = m * k * (mbs * self.tokens_per_sample + t_half)
        bubble = compute * (self.pp_size - 1) / m
        comm = exposed = optimizer = 0.0
        if device:
            times = self.reduction_times()
            comm = min(times.values())
            # Backward is ~2/3 of forward+backward; the last micro-batch's backward hides comm.
            exposed = max(0.0, comm - self.overlap_fraction * compute / m * 2.0 / 3.0)
            shard = (self.tp_size * self.pp_size
                     * (self.dp_size if self.distributed_optimizer else 1))
            optimizer = (self.param_count / shard * self.optimizer_bytes_per_param
                         / (self.topology.gpu_hbm_GBps * 1e9))
        return dict(compute_s=compute, bubble_s=bubble, comm_s=comm, exposed_comm_s=exposed,
                    optimizer_s=optimizer, step_s=compute + bubble + exposed + optimizer)

    def _prior_step(self, mbs: int, m: float) -> float:
        """Prior step time (relative units without a device model): chooses the split."""
        k = self._prior_per_token_s() if self.device_model else 1.0
        return self._parts(mbs, m, k, self.overhead_tokens, self.device_model)["step_s"]

    def predict_step_time(self, mbs: int, m: int) -> Optional[float]:
        """Predicted seconds of a step of `m` micro-batches of `mbs` (None: no model yet)."""
        k, t_half = self.step_time.fit()
        if k is None:
            return None
        return self._parts(mbs, m, k, t_half, self.device_model)["step_s"]

    def observe(self, mbs: int, m: int, seconds: float) -> None:
        """A measured step time of the split (mbs, m): refines k and t_half. Feed the same
        times on every rank (e.g. the max over ranks) if decisions depend on them."""
        k, t_half = self.step_time.fit()
        fixed = 0.0
        if k is not None and self.device_model:
            p = self._parts(mbs, m, k, t_half, True)
            fixed = p["exposed_comm_s"] + p["optimizer_s"]
        self.step_time.observe(mbs, m, mbs * self.tokens_per_sample, m + self.pp_size - 1,
                               fixed, seconds)
        self._cache.clear()

    def load_step_time(self, state: dict) -> None:
        """Restore measured step times (`self.step_time.state_dict()` of a checkpoint)."""
        self.step_time.load_state_dict(state)
        self._cache.clear()

    # ------------------------------------------------------------------ splits
    def split_options(self, global_batch: int) -> List[Tuple[int, int]]:
        """Runnable (micro-batch, accumulation) splits: B = mbs * m * dp, mbs in [min, max],
        m >= pp (1F1B needs pp micro-batches in flight to fill the pipeline)."""
        if global_batch < 1 or global_batch % self.dp_size:
            return []
        per_rank = global_batch // self.dp_size
        return [(mbs, per_rank // mbs)
                for mbs in range(min(self.max_micro_batch_size, per_rank),
                                 self.min_micro_batch_size - 1, -1)
                if per_rank % mbs == 0 and per_rank // mbs >= self.pp_size]

    def _split(self, global_batch: int) -> Tuple[Optional[Tuple[int, int]], float]:
        """(fastest split or None, its split efficiency), from the prior model."""
        if global_batch not in self._split_cache:
            opts = self.split_options(global_batch)
            if not opts:
                self._split_cache[global_batch] = (None, 0.0)
            else:
                best = min(opts, key=lambda o: (self._prior_step(*o), -o[0]))
                per_rank = global_batch // self.dp_size
                top = min(self.max_micro_batch_size, per_rank // self.pp_size)
                ideal = min(self._prior_step(b, per_rank / b)
                            for b in range(self.min_micro_batch_size, max(top, best[0]) + 1))
                self._split_cache[global_batch] = (best, min(1.0, ideal / self._prior_step(*best)))
        return self._split_cache[global_batch]

    def micro_batch_for(self, global_batch: int) -> Optional[int]:
        """The micro-batch of the fastest split of `global_batch` (None if none runs)."""
        best = self._split(global_batch)[0]
        return None if best is None else best[0]

    def split_efficiency(self, global_batch: int) -> float:
        """Predicted step time of an unconstrained split (any micro-batch up to the max,
        fractional accumulation) over that of the best runnable one: 1.0 = no loss, 0.0 =
        not runnable. Micro-batch 1 x 37 with a max of 13 at s=2048 scores ~0.8."""
        return self._split(global_batch)[1]

    def is_valid(self, global_batch: int) -> bool:
        """The layout can run `global_batch` (whatever its split efficiency)."""
        return self._split(global_batch)[0] is not None

    def next_valid(self, lo: int, limit: int = 10 ** 7) -> Optional[int]:
        """Smallest runnable global batch >= lo (None if none up to `limit`)."""
        b = max(self.dp_size, -(-max(lo, 1) // self.dp_size) * self.dp_size)
        while b <= limit:
            if self.is_valid(b):
                return b
            b += self.dp_size
        return None

    def efficient_batches(self, lo: int, hi: int,
                          min_efficiency: Optional[float] = None) -> List[int]:
        """Runnable global batches in [lo, hi] whose split efficiency is >= min_efficiency
        (default `min_split_efficiency`): what batch rounding should choose from."""
        thr = self.min_split_efficiency if min_efficiency is None else min_efficiency
        start = max(self.dp_size, -(-max(lo, 1) // self.dp_size) * self.dp_size)
        return [b for b in range(start, hi + 1, self.dp_size)
                if self.is_valid(b) and self.split_efficiency(b) >= thr]

    def valid_global_batches(self, lo: int, hi: int) -> List[int]:
        """The global batches in [lo, hi] the controller may grow to: runnable (multiples of
        dp) with a split efficiency >= min_split_efficiency."""
        return self.efficient_batches(lo, hi)

    # ------------------------------------------------------------------ communication
    def grad_bytes(self) -> float:
        """Gradient bytes each GPU reduces: its tp*pp shard of the parameters."""
        return self.param_count / (self.tp_size * self.pp_size) * self.grad_dtype_bytes

    def _dp_layout(self):
        return dp_layout(self.topology, self.dp_size, self.tp_size)

    def reduction_times(self) -> Dict[str, float]:
        """Predicted seconds of each gradient all-reduce algorithm over the dp group
        (`topology.predict_reduction_times`)."""
        if self._reduction is None:
            self._reduction = predict_reduction_times(self.topology, self.grad_bytes(),
                                                      self.dp_size, self.tp_size)
        return dict(self._reduction)

    def step_time_by_reduction(self, global_batch: int) -> Dict[str, float]:
        """Prior step time of `global_batch` with each reduction algorithm (`--dp-reduction
        auto` picks the faster one for the largest batch the run may reach)."""
        best = self._split(global_batch)[0]
        if best is None:
            raise ValueError(f"global batch {global_batch} cannot run on this layout")
        mbs, m = best
        p = self._parts(mbs, m, self._prior_per_token_s(), self.overhead_tokens, True)
        hidden = self.overlap_fraction * p["compute_s"] / m * 2.0 / 3.0
        base = p["compute_s"] + p["bubble_s"] + p["optimizer_s"]
        return {name: base + max(0.0, t - hidden) for name, t in self.reduction_times().items()}

    # ------------------------------------------------------------------ plan
    def plan(self, global_batch: int) -> Plan:
        """Plan for `global_batch`; ValueError (with a fix) if the layout cannot run it."""
        if global_batch in self._cache:
            return self._cache[global_batch]
        best, eff = self._split(global_batch)
        if best is None:
            raise ValueError(
                f"global batch {global_batch} cannot run with dp={self.dp_size}, "
                f"pp={self.pp_size}, micro-batch in [{self.min_micro_batch_size}, "
                f"{self.max_micro_batch_size}]: it must be a multiple of dp and give >= pp "
                f"micro-batches per rank; nearest valid: "
                f"{self._nearest_valid(global_batch)}")
        mbs, m = best
        times = self.reduction_times()
        k, t_half = self.step_time.fit()
        if k is None:
            parts, source = {}, NO_MODEL
        else:
            parts = self._parts(mbs, m, k, t_half, self.device_model)
            source = ("model" if not self.step_time.measured else
                      f"fitted to {len(self.step_time.points)} measured split(s)")
        step = parts.pop("step_s", math.nan)
        samples_per_s = global_batch / step
        tokens = samples_per_s * self.seq_length if self.seq_length else None
        breakdown = dict(parts, grad_bytes=self.grad_bytes(), overhead_tokens=t_half,
                         **{f"comm_{k}_s": v for k, v in times.items()})
        p = Plan(global_batch=global_batch, micro_batch_size=mbs, num_microbatches=m,
                 dp_size=self.dp_size, reduction=min(times, key=times.get),
                 predicted_step_time_s=step, predicted_samples_per_s=samples_per_s,
                 predicted_tokens_per_s=tokens, breakdown=breakdown, split_efficiency=eff,
                 step_time_source=source)
        self._cache[global_batch] = p
        return p

    def _nearest_valid(self, b: int) -> str:
        dp = self.dp_size
        below = [x for x in range(b - b % dp, max(0, b - 64 * dp), -dp) if self.is_valid(x)]
        above = [x for x in range(b - b % dp + dp, b + 64 * dp, dp) if self.is_valid(x)]
        return ", ".join(str(x) for x in (below[:1] + above[:1])) or "none nearby"

    def describe(self) -> str:
        """One line: where the predicted step times come from."""
        if not self.device_model and not self.step_time.measured:
            return f"step time: {NO_MODEL} (predictions start after the first measured step)"
        return (f"step time: {self.topology.gpu_name} model at MFU {self.mfu_assumed:g}, "
                f"{self.step_time.describe()}")

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
                    distributed_optimizer=self.distributed_optimizer,
                    overhead_tokens=self.overhead_tokens, device_model=self.device_model,
                    min_split_efficiency=self.min_split_efficiency,
                    step_time=self.step_time.state_dict())

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.topology.load_state_dict(state.pop("topology"))
        step_time = state.pop("step_time", None)
        for k, v in state.items():
            setattr(self, k, v)
        self._reset()
        if step_time is not None:
            self.step_time.load_state_dict(step_time)


def plan_as_dict(p: Plan) -> dict:
    return asdict(p)
