"""HuggingFace interop: import Llama-family and GPT-2 models, export checkpoints back.

Main API (``megatron_ext.hf.convert``): ``import_hf(hf_dir, save, args)``,
``export_hf(load, hf_dir, args, dtype)``, ``loaded_model(load, args)``, ``full_logits``;
the pure tables in ``megatron_ext.hf.mapping`` (config.json <-> model flags, weight names) and
the tensor transforms in ``megatron_ext.hf.weights``. The command line is
``tools/convert_hf.py``. ``transformers`` and ``safetensors`` are optional dependencies
(``pip install 'megatron_ext[hf]'``); this package imports them only when converting.
"""
