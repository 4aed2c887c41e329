"""Check that every engine trains the same model as one plain process: a table of per-step losses and
the largest weight difference per engine, exit status 1 when any engine is outside the tolerance.

    python tools/check_equivalence.py --model gpt2-tiny --steps 5               # spawns a 2-rank CPU world
    torchrun --nproc_per_node 8 tools/check_equivalence.py --model gpt2-124m --engines ddp,fsdp,zero1,zero2,zero3 --steps 5
    deepspeed --num_gpus 8 tools/check_equivalence.py --model gpt2-124m --steps 5

Use it to validate a new cluster, or a new PyTorch / DeepSpeed version, before a long run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from gpt2_scale.config import ENGINES
from gpt2_scale.harness.case import Case
from gpt2_scale.harness.compare import Tolerance, format_table, mismatches
from gpt2_scale.harness.run import Result
from gpt2_scale.zoo import ModelConfig


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Case, list[str], Tolerance]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2-tiny", help="a zoo name (default gpt2-tiny)")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, from {','.join(ENGINES)}")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--micro-batch", type=int, default=2, help="sequences per rank per micro-step")
    p.add_argument("--accum", type=int, default=2, help="micro-steps per optimizer step")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4, help="peak lr (warms up linearly over the steps)")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--deterministic", action="store_true", help="train.deterministic=true for the engine runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world-size", type=int, default=2, help="ranks of the CPU world spawned without a launcher")
    p.add_argument("--rtol", type=float, help="losses, gradient norms, weights and logits; default: 1e-5 for fp32, "
                   "2^-7 for bf16 (see gpt2_scale/harness/compare.py)")
    p.add_argument("--atol", type=float, help="logits; default: 1e-6 for fp32")
    p.add_argument("--grad-rtol", type=float, help="gradient elements as a fraction of their tensor's largest, which "
                   "bounds the weights through Adam; default: 1e-4 for fp32")
    p.add_argument("--workdir", default="runs/check_equivalence", help="scratch directory every rank can reach (launched runs)")
    args = p.parse_args(argv)
    engines = [e for e in args.engines.split(",") if e]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown or not engines:
        raise ValueError(f"unknown engine(s) {', '.join(unknown) or '(none given)'}; valid: {', '.join(ENGINES)}")
    launched = "RANK" in os.environ
    world = int(os.environ["WORLD_SIZE"]) if launched else args.world_size
    case = Case(
        ModelConfig.from_name(args.model, pad_vocab=True),
        engines[0],
        world_size=world,
        micro_batch=args.micro_batch,
        accum=args.accum,
        seq_len=args.seq_len,
        steps=args.steps,
        lr=args.lr,
        grad_clip=args.grad_clip,
        dtype=args.dtype,
        seed=args.seed,
        deterministic=args.deterministic,
    )
    given = {name: getattr(args, name) for name in ("rtol", "atol", "grad_rtol") if getattr(args, name) is not None}
    tol = dataclasses.replace(Tolerance.for_dtype(args.dtype), **given)
    return args, case, engines, tol


def run_spawned(case: Case, engines: list[str]) -> dict[str, Result | str]:
    """No launcher: a CPU world of case.world_size worker processes runs each engine in turn."""
    from gpt2_scale.harness.pool import WorkerError, WorkerPool

    results: dict[str, Result | str] = {}
    with WorkerPool(case.world_size) as pool:
        for engine in engines:
            try:
                results[engine] = pool.run(case.replace(engine=engine))
            except WorkerError as e:
                results[engine] = f"error: {e}"
    return results


def run_launched(case: Case, engines: list[str], workdir: Path):
    """Under torchrun / deepspeed: every rank runs each engine; rank 0 gets the results.

    The process group is gone when this returns, so rank 0 can train the reference alone.
    """
    from gpt2_scale import distributed
    from gpt2_scale.harness.run import run_engine

    env = distributed.init("auto")
    try:
        results = {engine: run_engine(case.replace(engine=engine), env, workdir) for engine in engines}
    finally:
        distributed.shutdown()
    return env, results


def report(case: Case, engines: list[str], results: dict[str, Result | str], reference: Result, tol: Tolerance) -> int:
    print(f"{case.model.name}: {case.steps} steps, {case.world_size} rank(s) x {case.accum} micro-step(s) x "
          f"{case.micro_batch} sequence(s) of {case.seq_len} tokens, {case.dtype}, lr {case.lr:g}; "
          f"reference: one process, the whole batch at once\n")
    print(format_table(reference, {e: r if isinstance(r, Result) else "error" for e, r in results.items()}, tol))
    failed = False
    for engine, r in results.items():
        problems = [r] if isinstance(r, str) else mismatches(r, reference, tol)
        for line in problems:
            print(f"{engine}: {line}")
        failed |= bool(problems)
    weights = f", logits atol {tol.atol:.1e}, gradients {tol.grad_rtol:.1e} through Adam" if tol.weights else " (weights not compared in bf16)"
    print(f"\n{'FAIL' if failed else 'OK'}: tolerance rtol {tol.rtol:.1e}{weights}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    try:
        args, case, engines, tol = parse_args(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from gpt2_scale.harness.run import reference

    if "RANK" not in os.environ:
        results = run_spawned(case, engines)
        return report(case, engines, results, reference(case), tol)
    env, results = run_launched(case, engines, Path(args.workdir))
    if not env.is_main:
        return 0
    return report(case, engines, results, reference(case, env.device), tol)


if __name__ == "__main__":
    sys.exit(main())
