"""The training loop behind ``examples/pretrain_gpt.py``: ``megatron_ext.training.main``."""


def main(argv=None):
    from megatron_ext.training.loop import main as _main

    return _main(argv)
