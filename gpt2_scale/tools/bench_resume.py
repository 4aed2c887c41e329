"""Memory and time a checkpoint costs beyond the engine's own: the peak while one engine saves and another loads it.

    python tools/bench_resume.py --model gpt2-124m --save-as zero3 --load-as ddp    # one process, CPU or one GPU

The save runs after one optimizer step (Adam's state exists), the load into a freshly built engine. Reported: the
process's resident memory (on CPU; CUDA's allocated bytes on a GPU) before each, and its peak during each,
sampled every 5 ms; the difference is what the checkpoint itself needs (engines/layout.py and ZeROEngine say why).
Also each phase's seconds, and how many of them one pass of SHA-256 over the checkpoint's files takes: a save
hashes what it wrote, a load what it reads (checkpoint.py), each rank a share.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from gpt2_scale.config import ENGINES
from gpt2_scale.errors import quiet_when_the_reader_left
from gpt2_scale.tools.args import model_name, positive

GiB = 2**30


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_during(fn: Callable[[], object], device: torch.device) -> tuple[int, int]:
    """(bytes before, peak bytes while ``fn`` runs): CUDA's allocator on a GPU, else the process's resident set."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return before, torch.cuda.max_memory_allocated(device)
    before, peak, done = resident_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return before, max(peak[0], resident_bytes())


@quiet_when_the_reader_left
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=model_name, default="gpt2-124m", help="a zoo name")
    p.add_argument("--save-as", default="zero3", choices=ENGINES, help="the engine that writes the checkpoint")
    p.add_argument("--load-as", default="ddp", choices=ENGINES, help="the engine that reads it")
    p.add_argument("--seq-len", type=positive, default=64, help="tokens of the one training step (activations are not the point)")
    args = p.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each rank would save into a temporary directory of its own
        p.error("it runs in one process (python tools/bench_resume.py ...), not under a launcher")

    from gpt2_scale import checkpoint, distributed, engines
    from gpt2_scale.config import Config, ConfigError, validate
    from gpt2_scale.step import optimizer_step
    from gpt2_scale.train import build_model
    from gpt2_scale.zoo import ModelConfig

    if problem := ModelConfig.from_name(args.model).context_problem(args.seq_len, "--seq-len"):
        p.error(problem)
    cfg = Config()
    cfg.model.name, cfg.engine.compile = args.model, False
    cfg.train.micro_batch, cfg.train.seq_len, cfg.train.total_batch_tokens = 1, args.seq_len, args.seq_len
    try:
        validate(cfg)
    except ConfigError as e:
        p.error(str(e))
    env = distributed.init("auto")
    tokens = torch.randint(0, 50257, (1, args.seq_len), device=env.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        meta = {"model": args.model, "engine": args.save_as}
        for phase, name in (("save", args.save_as), ("load", args.load_as)):
            cfg.engine.name = name
            torch.manual_seed(0)
            engine = engines.build(cfg, env)
            engine.setup(build_model(cfg).to(env.device))
            if phase == "save":
                optimizer_step(engine, [(tokens, tokens)], 1e-4, env.device)
                work = partial(checkpoint.save, engine, Path(tmp), 1, meta, {"step": 1}, env, keep=1)
            else:
                work = partial(checkpoint.load, engine, checkpoint.latest(Path(tmp)))
            start = time.perf_counter()
            before, peak = peak_during(work, env.device)
            rows.append((phase, name, before, peak, time.perf_counter() - start))
            engine.close()
            del engine
        path = checkpoint.latest(Path(tmp))
        start = time.perf_counter()
        checkpoint.check_sums(path)  # what a load does before the engine reads, here in one process
        hashed, size = time.perf_counter() - start, sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    distributed.shutdown()
    what = "CUDA allocated" if env.device.type == "cuda" else "resident"
    print(f"{args.model}, one process on {env.device.type}; {what} GiB")
    print(f"{'phase':6} {'engine':6} {'before':>8} {'peak':>8} {'extra':>8} {'seconds':>8}")
    for phase, name, before, peak, seconds in rows:
        print(f"{phase:6} {name:6} {before / GiB:8.2f} {peak / GiB:8.2f} {(peak - before) / GiB:8.2f} {seconds:8.2f}")
    print(f"SHA-256 of the checkpoint's {size / GiB:.2f} GiB: {hashed:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
