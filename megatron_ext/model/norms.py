"""Sequence-parallel-aware LayerNorm / RMSNorm for megatron-core layer specs.

Main API: :class:`SPNorm` (use it in a ``ModuleSpec`` wherever Megatron builds a norm).

megatron-core's torch fallback (``WrappedTorchNorm``) asserts ``not sequence_parallel``
because with SP each tensor-parallel rank normalises a different slice of the sequence, so
the norm's weight/bias gradients are *partial* sums that must be all-reduced over the TP
group. Megatron already does that all-reduce (``finalize_model_grads`` ->
``_allreduce_non_tensor_model_parallel_grads``) for every parameter carrying the attribute
``sequence_parallel=True``; this module only sets that attribute, so apex and Transformer
Engine are not needed for sequence parallelism.
"""

from __future__ import annotations

import torch

from megatron.core.transformer.transformer_config import TransformerConfig


class SPNorm(torch.nn.Module):
    """LayerNorm or RMSNorm (``config.normalization``) whose params know about SP.

    Input/output: ``[s, b, h]`` (or ``[s/t, b, h]`` under sequence parallelism).
    Computes in fp32 and returns the input dtype, like Megatron's fused norms. Input may
    also be ``[s, b, heads, head_dim]`` (``--qk-layernorm``).
    """

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str | None = None,
    ):
        super().__init__()
        self.normalization = normalization or config.normalization
        if self.normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(
                f"--normalization {self.normalization} is not supported: use LayerNorm or RMSNorm"
            )
        self.eps = eps
        # Zero-centred gamma stores (gamma - 1) so weight decay pulls towards identity.
        self.zero_centered_gamma = zero_centered_gamma or config.layernorm_zero_centered_gamma
        init = torch.zeros if self.zero_centered_gamma else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=config.params_dtype))
        self.bias = (
            torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
            if self.normalization == "LayerNorm"
            else None
        )
        for p in self.parameters():
            # Megatron all-reduces grads of params marked like this over the TP group.
            setattr(p, "sequence_parallel", config.sequence_parallel)

    def gamma(self) -> torch.Tensor:
        return self.weight + 1 if self.zero_centered_gamma else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalization == "LayerNorm":
            # ATen's mixed-dtype layer norm: x in its own dtype, fp32 γ/β and math, output in
            # x's dtype; autograd then saves x itself, not an fp32 copy of it.
            return torch.nn.functional.layer_norm(
                x, (x.shape[-1],), self.gamma().float(), self.bias.float(), self.eps
            )
        x32 = x.float()  # [s, b, h]
        out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        out = out * self.gamma().float()
        return out.to(x.dtype)
