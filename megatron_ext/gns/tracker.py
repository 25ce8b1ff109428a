"""Gradient-noise-scale tracker for megatron-core training (TP/SP/PP/DP, grad accumulation).

Main API:
    tracker = GNSTracker(gns_config)                    # before the model
    specs = gns_layer_specs(tracker)                    # megatron_ext.gns.layers
    model = GPTModel(..., transformer_layer_spec=get_gpt_block_spec(
        config, get_gpt_layer_spec(**specs), norm=specs["norm"]))
        # or GNSGPTModel(..., gns_recorder=tracker) (gns.embedding) to include the
        # word embedding and output layer
    tracker.attach(ddp_model_chunks)                    # after DDP wrapping
    config.finalize_model_grads_func = tracker.wrap_finalize_model_grads(finalize_model_grads)
    per step:  tracker.begin_step(num_microbatches, micro_batch_size)
               forward_backward_func(...)             # GNS layers report during backward
               m = tracker.end_step(tokens)            # before optimizer.step() (it clips)
    tracker.history, tracker.state_dict(), tracker.load_state_dict(sd), tracker.plot(path)

What is measured (McCandlish et al. 2018, App. A): per-sample gradients h_i and their mean
G_B over the global batch, restricted to the *tracked* parameter set = every parameter of a
layer built with this tracker as recorder: all linear weights and biases and all norm γ/β of
the transformer block, plus the word embedding and output layer (tied or not) when the
model is a `GNSGPTModel` with this recorder (tied weights: with the cross term).

Loss normalisation: Megatron's calculate_per_token_loss=True (the loss is the token sum,
finalize divides by the global loss-token count N, which the finalize wrapper captures).
The per-sample gradient is h_i = (B / N) Σ_{t in i} ∇ℓ_t, whose mean over the B samples is
exactly the reduced main_grad. With N / B loss tokens in every sample (no padding mask) h_i
is the gradient of sample i's mean-token loss; with masked tokens samples are weighted by
their token count, consistently in |h_i|² and |G_B|². `loss_scale` undoes an fp16 scaler.

Distributed optimizer: the reduce-scattered main_grad shards are summed over DP ranks.
Not supported: context parallelism, MoE experts (not tracked), the data-parallel estimator
with overlap_grad_reduce (the job config checks the layout).

Per-sample norms: layers add [b] partial squared norms (or [b, h] TP-partial vectors for
sequence-parallel params) into slot (micro-batch m, sample j) of a [M * b] buffer; at
`end_step` the buffer is summed over the model-parallel group (TP shards + PP stages) and
gathered over data-parallel ranks (they hold different samples).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron.core import parallel_state as ps

from .config import GNSConfig
from .estimator import GNSEstimator, GNSMeasurement
from .grad_norms import distributed_optimizer_shards, local_grad_sq_norm
from .layers import tracked_parameters


class GNSTracker:
    """Collects per-sample and batch gradient norms and feeds a `GNSEstimator`.

    Build it before the model (its layers take it as `recorder`), then `attach` the
    DDP-wrapped model chunks.

    Args:
        config: the GNSConfig (estimator kind, EMA decay, include-embedding flag).
        flush_elements: pending sequence-parallel vectors are all-reduced over TP once
            their element count reaches this (bounds memory; identical on all TP ranks).
    """

    def __init__(self, config: GNSConfig, *, flush_elements: int = 1 << 24):
        self.config = config
        self.estimator = GNSEstimator(config.gns_ema_decay, config.gns_estimator,
                                      config.gns_ema_tokens)
        self.history: List[dict] = []
        self.flush_elements = int(flush_elements)
        self.params: List[torch.nn.Parameter] = []
        self._measuring = False
        self._num_tokens: Optional[int] = None
        self._small_sq_norms: Optional[List[float]] = None
        self.last_per_sample_sq_norms: Optional[List[float]] = None
        self.last_batch_sq_norm: Optional[float] = None
        self.last_small_sq_norms: Optional[List[float]] = None  # data-parallel estimator

    def attach(self, model_chunks: Sequence[torch.nn.Module]) -> None:
        """Find the tracked parameters of the (DDP-wrapped) model chunks of this rank.

        Call after DDP wrapping (needs the distributed optimizer's shard layout).
        """
        self.params = tracked_parameters(model_chunks, self)
        if not self.params:
            raise ValueError("the model has no GNS layers of this tracker: build it with "
                             "get_gpt_layer_spec(**gns_layer_specs(tracker))")
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.tp_size = ps.get_tensor_model_parallel_world_size()
        self.mp_group = ps.get_model_parallel_group()  # TP x PP
        self.dp_group = ps.get_data_parallel_group()
        self.dp_size = ps.get_data_parallel_world_size()
        self._shard_ranges = distributed_optimizer_shards(model_chunks)
        # The distributed optimizer shards grads over one instance (all DP ranks, or a node's
        # with --dp-reduction hierarchical); every instance holds the whole reduced grad.
        self.shard_group = ps.get_data_parallel_group(with_context_parallel=True,
                                                      partial_data_parallel=True)

    # ---------------------------------------------------------------- step protocol
    def begin_step(self, num_microbatches: int, micro_batch_size: int,
                   global_batch: Optional[int] = None, *, loss_scale: float = 1.0) -> None:
        """Start measuring one optimizer step (call before forward_backward_func).

        num_microbatches, micro_batch_size: M and b of this step on this DP rank.
        global_batch: optional check that dp * M * b is the global batch.
        loss_scale: the fp16 loss-scaler value the grads still carry (1.0 for bf16/fp32).
        """
        if not self.params:
            raise RuntimeError("call tracker.attach(model_chunks) before measuring a step")
        self.M, self.b = int(num_microbatches), int(micro_batch_size)
        if global_batch is not None and int(global_batch) != self.dp_size * self.M * self.b:
            raise ValueError(f"global batch {global_batch} != data-parallel size {self.dp_size}"
                             f" x {self.M} micro-batches x micro-batch size {self.b}")
        self._num_tokens = None
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
        """Megatron's `config.finalize_model_grads_func`, with this tracker's hooks around it.

        Before the DP reduction it reads each rank's grads (data-parallel estimator);
        afterwards it records the global loss-token count N (finalize's `num_tokens`).
        """

        def finalize_with_gns(*args, **kwargs):
            return self._finalize(finalize_fn, *args, **kwargs)

        return finalize_with_gns

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

        `tokens`: tokens consumed by training up to and including this step (the caller
        owns the count; the x axis of the history). Collective: call on all ranks.
        Returns the measurement (same on every rank) or None if the step was skipped.
        """
        if not self._measuring:
            return None
        self._measuring = False
        if self._num_tokens is None:
            raise RuntimeError("GNSTracker needs megatron's calculate_per_token_loss=True and "
                               "config.finalize_model_grads_func = "
                               "tracker.wrap_finalize_model_grads(finalize_model_grads)")
        if self._num_tokens <= 0:
            self._pending, self._pending_elements = [], 0
            self.estimator.skip_step()
            return None
        # loss = Σ_tokens ℓ / N over the global batch: h_i = (B / N) Σ_{t in i} ∇ℓ has
        # mean_i h_i = main_grad, so the per-sample kernel norms scale by (B / N)².
        B = self.dp_size * self.M * self.b
        s, ls = B / self._num_tokens, self.loss_scale
        big_t = self._mp_sum(self._local_batch_sq_norm(reduce_sp=False), self._device())
        if self._shard_ranges is not None and self.dp_size > 1:
            dist.all_reduce(big_t, group=self.shard_group)  # ranks hold disjoint shards
        big = float(big_t) / ls ** 2
        self.last_batch_sq_norm = big
        if self.estimator.estimator == "data-parallel":
            m = self._update_data_parallel(s, big, B, tokens)
        else:
            per_sample = (self._gathered_per_sample() * (s / ls) ** 2).tolist()
            self.last_per_sample_sq_norms = per_sample
            m = self.estimator.update(per_sample, 1, big, B, tokens)
        if m is not None:
            self.history.append(m.to_dict())
        return m

    def _update_data_parallel(self, s: float, big: float, B: int, tokens: int):
        if self._small_sq_norms is None:
            raise RuntimeError("the data-parallel estimator needs the finalize wrapper: set "
                               "config.finalize_model_grads_func = "
                               "tracker.wrap_finalize_model_grads(finalize_model_grads)")
        small_b = self.M * self.b  # (DP = 1: the estimator refuses small_b == B)  # per-rank grad = Σ_{i on rank} h_i / s
        small_scale = (s / small_b / self.loss_scale) ** 2
        smalls = [x * small_scale for x in self._small_sq_norms]
        self.last_small_sq_norms = smalls
        return self.estimator.update(smalls, small_b, big, B, tokens)

    def _gathered_per_sample(self) -> torch.Tensor:
        """[dp * M * b] fp64 kernel norms of every sample of the global batch."""
        self._flush()
        totals = self._totals if self._totals is not None else torch.zeros(
            self.M * self.b, dtype=torch.float64)
        totals = self._mp_sum(totals, self._device())
        if self.dp_size > 1:
            out = [torch.zeros_like(totals) for _ in range(self.dp_size)]
            dist.all_gather(out, totals, group=self.dp_group)
            totals = torch.cat(out)
        return totals

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
        return (f"{len(self.params)} tracked tensors, {n / 1e6:.2f} M params on this rank, "
                f"embedding/output layer {emb}, per-token loss")
