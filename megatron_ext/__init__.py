"""megatron_ext: long-context GPT pretraining on megatron-core with gradient-noise-scale
measurement and dynamic global-batch growth."""

__version__ = "0.1.0"
