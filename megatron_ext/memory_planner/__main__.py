"""`python -m megatron_ext.memory_planner --num-layers ... --seq-length ...`."""
from .cli import main

raise SystemExit(main())
