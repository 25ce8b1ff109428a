"""Convert between HuggingFace models and megatron_ext checkpoints.

    python tools/convert_hf.py import --hf-dir DIR --save OUT [pretrain_gpt.py flags]
    python tools/convert_hf.py export --load CKPT --hf-dir OUT [--dtype bfloat16] [model flags]

``import`` reads a Llama-family or GPT-2 model (config.json + *.safetensors), prints the model
flags to train it with (``examples/pretrain_gpt.py --load OUT <flags>`` starts from it as a
finetune: iteration 0, a new optimizer) and writes OUT/iter_0000000, which loads under any
TP/PP layout (run it under torchrun with --tensor-model-parallel-size N for models one process
cannot hold). ``export`` writes model.safetensors + config.json that
``transformers.AutoModelForCausalLM.from_pretrained(OUT)`` loads; the model flags come from
the checkpoint (give them for checkpoints that lack them, e.g. Megatron-LM's). Errors are one
``convert_hf.py: error:`` line. Logic: :mod:`megatron_ext.hf`.
"""
import argparse
import os
import sys


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="HuggingFace directory -> megatron_ext checkpoint")
    imp.add_argument("--hf-dir", required=True, help="config.json + *.safetensors")
    imp.add_argument("--save", required=True, help="new checkpoint directory")
    exp = commands.add_parser("export", help="megatron_ext checkpoint -> HuggingFace directory")
    exp.add_argument("--load", required=True, help="a --save directory or one iter_N in it")
    exp.add_argument("--hf-dir", required=True, help="output directory")
    exp.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                     help="tensor dtype (default: the imported model's, else float32)")
    return parser.parse_known_args(argv)


def main(argv=None) -> int:
    args, rest = parse(sys.argv[1:] if argv is None else argv)
    from megatron_ext.hf.convert import export_hf, import_hf
    from megatron_ext.training.errors import CheckpointMismatch, JobError

    try:
        if args.command == "import":
            path, flags = import_hf(args.hf_dir, args.save, rest)
            if os.environ.get("RANK", "0") == "0":
                print(f"convert_hf.py: wrote {path}; train it with\n  examples/pretrain_gpt.py "
                      f"--load {args.save} {' '.join(flags)}", flush=True)
        else:
            print(f"convert_hf.py: wrote {export_hf(args.load, args.hf_dir, rest, args.dtype)}",
                  flush=True)
    except (ValueError, JobError, CheckpointMismatch) as e:
        print(f"convert_hf.py: error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
