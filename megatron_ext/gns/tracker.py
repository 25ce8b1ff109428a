"""Gradient-noise-scale tracker for megatron-core training (TP/SP/PP/DP, grad accumulation).

Main API:
    tracker = GNSTracker(gns_config, model_chunks)
    config.finalize_model_grads_func = tracker.wrap_finalize_model_grads(finalize_model_grads)
    per step:  tracker.begin_step(num_microbatches, micro_batch_size)
               forward_backward_func(...)             # GNS layers report during backward
               m = tracker.end_step(tokens)            # before optimizer.step() (it clips)
    tracker.history, tracker.state_dict(), tracker.load_state_dict(sd), tracker.plot(path)

What is measured (McCandlish et al. 2018, App. A): g_i = gradient of sample i's mean-token
loss and G_B = mean_i g_i over the global batch, both restricted to the *tracked* parameter
set = every parameter of a GNS layer (`megatron_ext.gns.layers`): all linear weights and
biases and all norm γ/β of the transformer block. By default the word embedding and the
output layer (tied or not) are left out of both |g_i|² and |G_B|² (B_simple of the
transformer block). With `gns_include_embedding` the tracker swaps them to the GNS classes
of `megatron_ext.gns.embedding` and they are included exactly (tied weights: with the
cross term; not supported with tied weights under PP > 1).

Distributed optimizer: the reduce-scattered main_grad shards are summed over DP ranks.
Not supported: context parallelism (raises), calculate_per_token_loss, MoE experts,
learned absolute position embeddings with gns_include_embedding (raises).

Per-sample norms: layers add [b] partial squared norms (or [b, h] TP-partial vectors for
sequence-parallel params) into slot (micro-batch m, sample j) of a [M * b] buffer; at
`end_step` the buffer is summed over the model-parallel group (TP shards + PP stages) and
gathered over data-parallel ranks (they hold different samples).

Scale (read from the model config, nothing guessed): `loss_scale` undoes an fp16 loss scaler.
* mean-token loss (calculate_per_token_loss=False): a micro-batch's loss is the mean over its
  tokens / M, so the kernel sees g_i / (M * b); `sample_grad_scale` (default M * b) undoes it.
  DDP averages over DP ranks, so main_grad = G_B * B / (dp * sample_grad_scale) (= G_B).
* per-token loss (calculate_per_token_loss=True, loss = token sum, finalize divides by the
  global loss-token count N, captured by the finalize wrapper): the per-sample gradient is
  h_i = (B / N) Σ_{t in i} ∇ℓ_t, whose mean over the B samples is exactly the reduced
  main_grad. With N / B loss tokens in every sample (no padding mask) h_i is the gradient of
  sample i's mean-token loss; with masked tokens samples are weighted by their token count,
  consistently in |h_i|² and |G_B|².
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron.core import parallel_state as ps

from .config import GNSConfig
from .estimator import GNSEstimator, GNSMeasurement
from .grad_norms import distributed_optimizer_shards, local_grad_sq_norm
from .layers import GNSColumnParallelLinear, GNSNorm, GNSRowParallelLinear

GNS_LAYER_TYPES = (GNSColumnParallelLinear, GNSRowParallelLinear, GNSNorm)


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    while hasattr(chunk, "module") and isinstance(chunk.module, torch.nn.Module):
        chunk = chunk.module
    return chunk


class GNSTracker:
    """Collects per-sample and batch gradient norms and feeds a `GNSEstimator`.

    Args:
        config: the GNSConfig (estimator kind, EMA decay, include-embedding flag).
        model_chunks: the (DDP-wrapped) model chunks of this rank, as given to the schedule.
        seq_length: only shown by describe().
        per_token_loss: the loss normalisation (see "Scale" above); None = read
            calculate_per_token_loss from the model's TransformerConfig.
        flush_elements: pending sequence-parallel vectors are all-reduced over TP once
            their element count reaches this (bounds memory; identical on all TP ranks).
    """

    def __init__(self, config: GNSConfig, model_chunks: Sequence[torch.nn.Module], *,
                 seq_length: Optional[int] = None, per_token_loss: Optional[bool] = None,
                 flush_elements: int = 1 << 24):
        self.config = config
        self.seq_length = seq_length  # only for describe()
        self.estimator = GNSEstimator(config.gns_ema_decay, config.gns_estimator)
        self.history: List[dict] = []
        self.flush_elements = int(flush_elements)
        if ps.get_context_parallel_world_size() > 1:
            raise ValueError("--gns does not support context parallelism (per-sample norms "
                             "would be partial over CP ranks); use --context-parallel-size 1")
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.tp_size = ps.get_tensor_model_parallel_world_size()
        self.mp_group = ps.get_model_parallel_group()  # TP x PP
        self.dp_group = ps.get_data_parallel_group()
        self.dp_size = ps.get_data_parallel_world_size()
        self.model_chunks = list(model_chunks)
        if config.gns_include_embedding:
            from .embedding import convert_embedding_layers

            pp = ps.get_pipeline_model_parallel_world_size()
            for c in self.model_chunks:
                convert_embedding_layers(_unwrap(c), pp)
        from .embedding import GNSVocabParallelEmbedding

        # MoE expert linears run megatron's own path (no per-sample norms): not tracked
        self.modules = [m for c in self.model_chunks for m in _unwrap(c).modules()
                        if isinstance(m, GNS_LAYER_TYPES + (GNSVocabParallelEmbedding,))
                        and not getattr(m, "is_expert", False)]
        if not self.modules:
            raise ValueError("the model has no GNS layers: build it with "
                             "get_gpt_layer_spec(**gns_layer_spec_kwargs())")
        self.params = []  # tracked parameters, each once
        seen = set()
        for m in self.modules:
            m.gns_tracker = self
            for p in m.parameters(recurse=False):
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    self.params.append(p)
        # Megatron's two loss normalisations (see the module docstring, "Scale"); by default
        # the one the schedule itself uses (TransformerConfig.calculate_per_token_loss).
        self.per_token_loss = bool(per_token_loss) if per_token_loss is not None else any(
            getattr(getattr(_unwrap(c), "config", None), "calculate_per_token_loss", False)
            for c in self.model_chunks)
        self._num_tokens: Optional[int] = None
        self._shard_ranges = distributed_optimizer_shards(self.model_chunks)
        if config.gns_estimator == "data-parallel":
            for c in self.model_chunks:
                if getattr(getattr(c, "ddp_config", None), "overlap_grad_reduce", False):
                    raise ValueError("--gns-estimator data-parallel reads each rank's grads "
                                     "before the DP reduction: use overlap_grad_reduce=False "
                                     "(drop --overlap-grad-reduce) or --gns-estimator per-sample")
        self._measuring = False
        self._small_sq_norms: Optional[List[float]] = None
        self.last_per_sample_sq_norms: Optional[List[float]] = None
        self.last_batch_sq_norm: Optional[float] = None
        self.last_small_sq_norms: Optional[List[float]] = None  # data-parallel estimator

    # ---------------------------------------------------------------- step protocol
    def begin_step(self, num_microbatches: int, micro_batch_size: int,
                   global_batch: Optional[int] = None, *,
                   sample_grad_scale: Optional[float] = None, loss_scale: float = 1.0) -> None:
        """Start measuring one optimizer step (call before forward_backward_func).

        num_microbatches, micro_batch_size: M and b of this step on this DP rank.
        global_batch: optional check that dp * M * b is the global batch.
        sample_grad_scale: (mean-token loss only) s with g_i = s * (grad of this rank's
            training loss restricted to sample i); default M * b, right for Megatron's
            mean-token loss / M. Ignored with calculate_per_token_loss (B / N is used).
        loss_scale: the fp16 loss-scaler value the grads still carry (1.0 for bf16/fp32).
        """
        self.M, self.b = int(num_microbatches), int(micro_batch_size)
        if global_batch is not None and int(global_batch) != self.dp_size * self.M * self.b:
            raise ValueError(f"global batch {global_batch} != data-parallel size {self.dp_size}"
                             f" x {self.M} micro-batches x micro-batch size {self.b}")
        self._num_tokens = None
        self.sample_grad_scale = float(sample_grad_scale if sample_grad_scale is not None
                                       else self.M * self.b)
        self.loss_scale = float(loss_scale)
        self._counts = {}
        self._totals: Optional[torch.Tensor] = None  # [M * b] fp64
        self._pending = []  # (micro-batch, [b, h] fp32) awaiting the TP all-reduce
        self._pending_elements = 0
        self._small_sq_norms = None
        self._tied_tokens, self._tied_rows = {}, {}
        self._measuring = True

    def microbatch_index(self, module) -> Optional[int]:
        """Called by a GNS layer's forward: its micro-batch index, or None (don't report).

        Every module runs its grad-enabled forwards in micro-batch order, also under
        pipeline schedules and full recompute (whose first forward runs without grad and
        whose re-forward runs in backward order, which is micro-batch order too).
        """
        if not (self._measuring and self.estimator.estimator == "per-sample"
                and torch.is_grad_enabled()):
            return None
        k = self._counts.get(id(module), 0)
        if k >= self.M:
            raise RuntimeError(f"{type(module).__name__} ran more grad-enabled forwards than "
                               f"the {self.M} micro-batches given to begin_step")
        self._counts[id(module)] = k + 1
        return k

    def _slot(self, mb: int, like: torch.Tensor) -> torch.Tensor:
        if self._totals is None:
            self._totals = torch.zeros(self.M * self.b, dtype=torch.float64, device=like.device)
        return self._totals[mb * self.b:(mb + 1) * self.b]

    def add_sq_norms(self, mb: int, sq: torch.Tensor, tp_duplicated: bool = False) -> None:
        """Add [b] squared-norm contributions; `tp_duplicated` ones count on TP rank 0 only."""
        if sq.numel() != self.b:
            raise ValueError(f"expected {self.b} per-sample norms, got shape {tuple(sq.shape)}")
        if tp_duplicated and self.tp_rank != 0:
            return
        self._slot(mb, sq).add_(sq.detach().reshape(-1).double())

    def add_grad_vectors(self, mb: int, vec: torch.Tensor) -> None:
        """Add per-sample gradient vectors [b, h] that are partial sums over TP ranks."""
        if self.tp_size == 1:
            self.add_sq_norms(mb, vec.square().sum(-1))
            return
        self._pending.append((mb, vec.detach().float()))
        self._pending_elements += vec.numel()
        if self._pending_elements >= self.flush_elements:
            self._flush()

    def _flush(self) -> None:
        # One TP all-reduce for all pending vectors; every TP rank has the same pending list
        # (same modules in the same order), so the collectives match.
        if not self._pending:
            return
        flat = torch.cat([v.reshape(-1) for _, v in self._pending])
        dist.all_reduce(flat, group=self.tp_group)
        offset = 0
        for mb, v in self._pending:
            full = flat[offset:offset + v.numel()].view_as(v)  # [b, h]
            offset += v.numel()
            if self.tp_rank == 0:  # the summed vector is now on every rank: count once
                self._slot(mb, v).add_(full.square().sum(-1).double())
        self._pending, self._pending_elements = [], 0

    # tied embedding/output weight (embedding.py): tokens go forward, output rows backward
    def set_tied_tokens(self, mb: int, idx: torch.Tensor, valid: Optional[torch.Tensor]) -> None:
        self._tied_tokens[mb] = (idx, valid)

    def tied_tokens(self, mb: int):
        return self._tied_tokens.pop(mb)

    def set_tied_rows(self, mb: int, rows: torch.Tensor) -> None:
        self._tied_rows[mb] = rows

    def pop_tied_rows(self, mb: int) -> torch.Tensor:
        return self._tied_rows.pop(mb)

    # ---------------------------------------------------------------- batch gradient
    def _local_batch_sq_norm(self, reduce_sp: bool) -> torch.Tensor:
        # after finalize (reduce_sp False) a distributed optimizer leaves reduced shards
        return local_grad_sq_norm(self.params, self.tp_group, reduce_sp,
                                  None if reduce_sp else self._shard_ranges, self._device())

    def _mp_sum(self, t: torch.Tensor, device) -> torch.Tensor:
        t = t.to(device)
        if dist.get_world_size(self.mp_group) > 1:
            dist.all_reduce(t, group=self.mp_group)
        return t

    def _device(self) -> torch.device:
        return self.params[0].device if self.params[0].device.type != "meta" else torch.device("cpu")

    def wrap_finalize_model_grads(self, finalize_fn: Callable) -> Callable:
        """Wrap megatron's finalize_model_grads for this tracker (see the module function)."""
        return wrap_finalize_model_grads(finalize_fn, lambda: self)

    def _finalize(self, finalize_fn: Callable, *args, **kwargs):
        if self._measuring and self.estimator.estimator == "data-parallel":
            # per-rank grads before the DP reduction: the small batch
            local = self._mp_sum(self._local_batch_sq_norm(reduce_sp=True), self._device())
            local = local.reshape(1)
            out = [torch.zeros_like(local) for _ in range(self.dp_size)]
            dist.all_gather(out, local, group=self.dp_group)
            self._small_sq_norms = [float(x) for x in torch.cat(out)]
        num_tokens = kwargs.get("num_tokens", args[1] if len(args) > 1 else None)
        result = finalize_fn(*args, **kwargs)
        if self._measuring and num_tokens is not None:
            # finalize broadcast it over PP and summed it over DP in place: global count N
            self._num_tokens = int(num_tokens.item())
        return result

    # ---------------------------------------------------------------- end of step
    def end_step(self, tokens: int) -> Optional[GNSMeasurement]:
        """Finish the step (after finalize_model_grads, before optimizer.step()).

        `tokens`: tokens consumed by this step (global batch). Collective: call on all ranks.
        Returns the measurement (same on every rank) or None if the step was skipped.
        """
        if not self._measuring:
            return None
        self._measuring = False
        dev = self._device()
        B = self.dp_size * self.M * self.b
        ls = self.loss_scale
        if self.per_token_loss:
            # loss = Σ_tokens ℓ / N over the global batch (finalize divides by N): with
            # h_i = (B / N) Σ_{t in i} ∇ℓ, mean_i h_i is exactly the reduced main_grad (=
            # the mean-token gradient g_i when every sample has N / B loss tokens).
            if self._num_tokens is None:
                raise RuntimeError("calculate_per_token_loss needs the finalize wrapper: set "
                                   "config.finalize_model_grads_func = "
                                   "tracker.wrap_finalize_model_grads(finalize_model_grads)")
            if self._num_tokens <= 0:
                self._pending, self._pending_elements = [], 0
                return self.estimator._skip_step(tokens)
            s = B / self._num_tokens
            big_scale = 1.0 / ls ** 2
        else:
            # main_grad after DDP = (1/dp) Σ_ranks Σ_i g_i / s  ->  G_B = main_grad * dp * s / B
            s = self.sample_grad_scale
            big_scale = (self.dp_size * s / B / ls) ** 2
        big_t = self._mp_sum(self._local_batch_sq_norm(reduce_sp=False), dev)
        if self._shard_ranges is not None and self.dp_size > 1:
            dist.all_reduce(big_t, group=self.dp_group)  # DP ranks hold disjoint shards
        big = float(big_t) * big_scale
        self.last_batch_sq_norm = big
        if self.estimator.estimator == "data-parallel":
            if self._small_sq_norms is None:
                raise RuntimeError("the data-parallel estimator needs the finalize wrapper: set "
                                   "config.finalize_model_grads_func = "
                                   "tracker.wrap_finalize_model_grads(finalize_model_grads)")
            if self.dp_size < 2:
                raise ValueError("--gns-estimator data-parallel needs data-parallel size >= 2")
            small_b = self.M * self.b  # per-rank grad = Σ_{i on rank} h_i / s
            small_scale = (s / small_b / ls) ** 2
            smalls = [x * small_scale for x in self._small_sq_norms]
            self.last_small_sq_norms = smalls
            m = self.estimator.update_two_batch(smalls, small_b, big, B, tokens)
        else:
            self._flush()
            totals = self._totals if self._totals is not None else torch.zeros(
                self.M * self.b, dtype=torch.float64)
            totals = self._mp_sum(totals, dev)
            if self.dp_size > 1:
                out = [torch.zeros_like(totals) for _ in range(self.dp_size)]
                dist.all_gather(out, totals, group=self.dp_group)
                totals = torch.cat(out)
            per_sample = (totals * (s / ls) ** 2).tolist()
            self.last_per_sample_sq_norms = per_sample
            m = self.estimator.update_per_sample(per_sample, big, tokens)
        if m is not None:
            self.history.append(m.to_dict())
        return m

    # ---------------------------------------------------------------- checkpoint / plot
    def state_dict(self) -> dict:
        return {"version": 1, "estimator": self.estimator.state_dict(),
                "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version", 1) != 1:
            raise ValueError(f"unknown GNSTracker state version {state.get('version')}")
        self.estimator.load_state_dict(state["estimator"])
        self.history = [dict(h) for h in state.get("history", [])]

    def plot(self, path: Optional[str] = None) -> bool:
        """Write the B_simple-vs-tokens PNG (default: config.gns_plot); True if written."""
        path = path or self.config.gns_plot
        if not path:
            return False
        from .plot import plot_gns_history

        return plot_gns_history(self.history, path)

    def describe(self) -> str:
        """One line for the training log: what is measured and how."""
        n = sum(p.numel() for p in self.params)
        emb = "included" if self.config.gns_include_embedding else "excluded"
        loss = "per-token loss" if self.per_token_loss else "mean-token loss / M"
        return (f"{len(self.params)} tracked tensors, {n / 1e6:.2f} M params on this rank, "
                f"embedding/output layer {emb}, {loss}")


def wrap_finalize_model_grads(finalize_fn: Callable, get_tracker: Callable) -> Callable:
    """Megatron's `config.finalize_model_grads_func`, with the tracker's hooks around it.

    `get_tracker()` returns the GNSTracker or None (so the wrapper can be installed before
    the tracker exists). Before the DP reduction it reads each rank's grads (data-parallel
    estimator); afterwards it records the global loss-token count (per-token loss).
    """

    def finalize_with_gns(*args, **kwargs):
        tracker = get_tracker()
        if tracker is None:
            return finalize_fn(*args, **kwargs)
        return tracker._finalize(finalize_fn, *args, **kwargs)

    return finalize_with_gns
