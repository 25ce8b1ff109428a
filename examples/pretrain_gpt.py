"""Pretrain a GPT with megatron-core and megatron_ext.

    torchrun --nproc_per_node 2 examples/pretrain_gpt.py            # tiny CPU smoke run
    torchrun --nproc_per_node 8 examples/pretrain_gpt.py --bf16 --num-layers 16 ...

See ``python examples/pretrain_gpt.py --help`` for every flag.
"""

import sys

from megatron_ext.training import main

if __name__ == "__main__":
    sys.exit(main())
