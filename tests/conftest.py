"""Shared pytest setup.

Triton decides at ``@triton.jit`` time whether a kernel runs in its CPU interpreter, from the
``TRITON_INTERPRET`` variable. Without CUDA, set it before any test module imports Triton
(megatron-core and torch may import it indirectly), so every kernel test runs the real Triton
kernel code in the interpreter rather than depending on test collection order.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_numpy_problem():
    """Triton < 3.7's interpreter turns 1-element arrays into loop bounds with int(), which
    NumPy >= 2.4 refuses: every interpreted kernel then fails deep inside Triton."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return None
    try:
        import numpy
        import triton
        from packaging.version import Version
    except ImportError:
        return None
    if Version(triton.__version__) < Version("3.7") and Version(numpy.__version__) >= Version("2.4"):
        return (f"triton {triton.__version__}'s CPU interpreter does not work with numpy "
                f"{numpy.__version__}: install 'numpy<2.4' (or triton>=3.7) in this environment")
    return None


def pytest_configure(config):
    problem = _interpreter_numpy_problem()
    if problem:
        raise pytest.UsageError(problem)
