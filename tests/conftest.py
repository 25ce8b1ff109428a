"""Shared pytest setup.

Triton decides at ``@triton.jit`` time whether a kernel runs in its CPU interpreter, from the
``TRITON_INTERPRET`` variable. Without CUDA, set it before any test module imports Triton
(megatron-core and torch may import it indirectly), so every kernel test runs the real Triton
kernel code in the interpreter rather than depending on test collection order.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
