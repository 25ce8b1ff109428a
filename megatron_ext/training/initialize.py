"""Process groups, devices and seeds.

Main API: :func:`initialize_megatron`, :func:`set_seeds`, :func:`optimizer_impl`.
"""

from __future__ import annotations

import datetime
import logging
import os
import random

import numpy as np
import torch

logger = logging.getLogger(__name__)


def initialize_megatron(job) -> str:
    """Initialise torch.distributed, megatron-core's parallel state and the micro-batch
    calculator (at the job's initial batch; the train state re-points it when the batch
    changes); returns the device type.

    Without CUDA the gloo backend runs and :mod:`megatron_ext.cpu_backend` redirects
    megatron-core's CUDA calls to CPU.
    """
    use_cuda = torch.cuda.is_available()
    backend = job.parallel.distributed_backend
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        from megatron_ext.cpu_backend import enable_cpu_backend

        enable_cpu_backend()
    if not torch.distributed.is_initialized():
        if "RANK" not in os.environ:  # plain `python pretrain_gpt.py`: a world of one
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        torch.distributed.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(minutes=job.parallel.distributed_timeout_minutes),
        )
    from megatron.core import parallel_state as ps
    from megatron.core.num_microbatches_calculator import init_num_microbatches_calculator

    from megatron_ext.training import dp_reduction

    # --dp-reduction: decided once, here, because megatron-core builds the groups of the
    # distributed-optimizer instances (one per node for hierarchical) with the others.
    reduction = dp_reduction.choose(job, dp_reduction.ranks_per_node(world_size=job.world_size))
    ps.initialize_model_parallel(
        tensor_model_parallel_size=job.tp,
        pipeline_model_parallel_size=job.pp,
        context_parallel_size=job.cp,
        num_distributed_optimizer_instances=reduction.instances,
    )
    if torch.distributed.get_rank() == 0 and job.parallel.dp_reduction != "flat":
        print(f"> {reduction.note}", flush=True)  # auto's decision, hierarchical's layout
    set_seeds(job.training.seed)
    t = job.training
    init_num_microbatches_calculator(torch.distributed.get_rank(), None, t.global_batch_size,
                                     t.micro_batch_size, ps.get_data_parallel_world_size())
    return "cuda" if use_cuda else "cpu"


def set_seeds(seed: int) -> None:
    """Same seed on every rank: data order comes from the sampler, and tensor-parallel
    dropout gets per-TP-rank streams from Megatron's RNG tracker."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def optimizer_impl(optimizer) -> str:
    """Which Adam/SGD megatron-core picked (Transformer Engine's or apex's fused one when
    importable, else torch's), e.g. "torch.optim.adamw.AdamW"."""
    chained = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    inner = getattr(chained[0], "optimizer", chained[0])
    return f"{type(inner).__module__}.{type(inner).__qualname__}"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
