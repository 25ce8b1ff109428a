"""Install megatron_ext.

`kernels/` holds the Triton kernels; it installs as `megatron_ext.kernels` (a top-level
`kernels` would clash with another PyPI package of that name).
"""
from setuptools import find_packages, setup

_ext_packages = find_packages(include=["megatron_ext", "megatron_ext.*"])
_kernel_packages = ["megatron_ext.kernels"] + [
    "megatron_ext.kernels." + p for p in find_packages(where="kernels")
]

setup(
    name="megatron_ext",
    version="0.1.0",
    description=(
        "Long-context pretraining on megatron-core with a fused per-sample-gradient-norm "
        "kernel, gradient-noise-scale measurement and dynamic global-batch growth"
    ),
    python_requires=">=3.10",
    packages=_ext_packages + _kernel_packages,
    package_dir={"megatron_ext.kernels": "kernels"},
    install_requires=[
        # megatron-core >= 0.17 needs Python >= 3.12; 0.16.1 is the API our CPU backend is checked against.
        "megatron-core==0.16.1",
        "torch>=2.4",
        "triton>=3.0",
        "numpy",
        "packaging",
        "psutil",  # megatron dist_checkpointing writer needs it
        "einops",  # megatron-core builds the groups of --dp-reduction hierarchical with it
    ],
    extras_require={
        # Optional accelerators are detected at run time; never list the unrelated PyPI `apex`.
        "flash": ["flash-attn"],
        "logging": ["tensorboard", "matplotlib", "wandb"],
        # Real tokenizers (GPT-2 BPE, HuggingFace, SentencePiece, tiktoken) and HF checkpoints.
        "tokenizers": ["transformers", "tokenizers", "sentencepiece", "tiktoken"],
        "hf": ["transformers", "safetensors"],
        "test": ["pytest", "tensorboard", "matplotlib", "wandb", "transformers", "tokenizers",
                 "sentencepiece", "tiktoken", "safetensors"],
    },
)
