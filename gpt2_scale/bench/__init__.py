"""Training-step benchmark: rows of engines and config overrides, each timed with the trainer's own optimizer step.

Each row reports ms/step, tokens/s, MFU against a datasheet peak and, on CUDA, against a bf16 8192³ matmul
measured in the same run, peak memory, and the model-state bytes a rank holds (``Engine.state_bytes``). The
walk-through's own loop can be timed beside them, so ours/walk-through is a measured ratio.

    rows.py         what a row is (BenchSpec, sweep) and what it measured (BenchResult)
    timing.py       timing one row in the current world
    walkthrough.py  the walk-through's loop, the baseline
    worlds.py       running rows in this world or in spawned CPU worlds
    report.py       the Markdown table and the JSON
    profile.py      where a row's step time goes (--profile)
"""

from gpt2_scale.bench import profile
from gpt2_scale.bench.report import table, to_json
from gpt2_scale.bench.rows import WALKTHROUGH, BenchResult, BenchSpec, override, sweep
from gpt2_scale.bench.worlds import run_all, spawn_cpu

__all__ = ["WALKTHROUGH", "BenchResult", "BenchSpec", "override", "profile", "run_all", "spawn_cpu", "sweep", "table", "to_json"]
