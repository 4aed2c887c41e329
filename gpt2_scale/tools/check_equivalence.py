"""Check that every engine trains the same model as one plain process: a table of per-step losses and
the largest weight difference per engine, exit status 1 when any engine is outside the tolerance.

    python tools/check_equivalence.py --model gpt2-tiny --steps 5               # spawns a 2-rank CPU world
    torchrun --nproc_per_node 8 tools/check_equivalence.py --model gpt2-124m --engines ddp,fsdp,zero1,zero2,zero3 --steps 5
    deepspeed --num_gpus 8 tools/check_equivalence.py --model gpt2-124m --steps 5
    python tools/check_equivalence.py --resume-at 2 --resume-as zero3 --resume-world 1  # moved mid-run

Use it to validate a new cluster, or a new PyTorch / DeepSpeed version, before a long run. With --resume-at
each engine's run stops at that step, checkpoints, and goes on from the checkpoint under --resume-as (and, in
the spawned CPU world, on --resume-world ranks): the whole run must still match the reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
from pathlib import Path

from gpt2_scale import memory
from gpt2_scale.config import ENGINES
from gpt2_scale.errors import quiet_when_the_reader_left
from gpt2_scale.harness.case import Case
from gpt2_scale.harness.compare import Tolerance, format_table, mismatches
from gpt2_scale.harness.run import Result, joined
from gpt2_scale.tools.args import engine_list, non_negative_float, positive, positive_float, random_seed
from gpt2_scale.zoo import ModelConfig


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Case, list[str], Tolerance]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2-tiny", help="a zoo name (default gpt2-tiny)")
    p.add_argument("--engines", type=engine_list, default=",".join(ENGINES), help=f"comma-separated, from {','.join(ENGINES)}")
    p.add_argument("--steps", type=positive, default=5)
    p.add_argument("--micro-batch", type=positive, default=2, help="sequences per rank per micro-step")
    p.add_argument("--accum", type=positive, default=2, help="micro-steps per optimizer step")
    p.add_argument("--seq-len", type=positive, default=64)
    p.add_argument("--lr", type=positive_float, default=1e-4, help="peak lr (warms up linearly over the steps)")
    p.add_argument("--grad-clip", type=non_negative_float, default=1.0)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--deterministic", action="store_true", help="train.deterministic=true for the engine runs")
    p.add_argument("--seed", type=random_seed, default=0)
    p.add_argument("--world-size", type=positive, default=2, help="ranks of the CPU world spawned without a launcher")
    p.add_argument("--rtol", type=non_negative_float, help="losses, gradient norms, weights and logits; default: 1e-5 for fp32, "
                   "2^-7 for bf16 (see gpt2_scale/harness/compare.py)")
    p.add_argument("--atol", type=non_negative_float, help="logits; default: 1e-6 for fp32")
    p.add_argument("--grad-rtol", type=non_negative_float, help="gradient elements as a fraction of their tensor's largest, which "
                   "bounds the weights through Adam; default: 1e-4 for fp32")
    p.add_argument("--workdir", default="runs/check_equivalence", help="a directory every rank can reach (launched runs); each "
                   "check works in a new directory of its own inside it, removed at the end")
    p.add_argument("--resume-at", type=int, help="stop each run after this many steps, checkpoint, and resume from it")
    p.add_argument("--resume-as", choices=ENGINES, help="the engine the runs resume under (default: their own)")
    p.add_argument("--resume-world", type=positive, help="ranks the runs resume on (spawned CPU world only; default: the same)")
    args = p.parse_args(argv)
    engines = args.engines
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
    if args.resume_at is not None and args.steps < 2:
        raise ValueError(f"--resume-at needs --steps >= 2 (a step before the stop and one after), got --steps {args.steps}")
    if args.resume_at is not None and not 0 < args.resume_at < args.steps:
        raise ValueError(f"--resume-at must be between 1 and --steps - 1 ({args.steps - 1}), got {args.resume_at}")
    if (args.resume_as or args.resume_world) and args.resume_at is None:
        raise ValueError("--resume-as and --resume-world need --resume-at STEP")
    if args.resume_world is not None and (launched or case.total_sequences % (case.micro_batch * args.resume_world)):
        raise ValueError("--resume-world works without a launcher (under one, the world is the launcher's), and "
                         f"--micro-batch x --resume-world must divide the batch of {case.total_sequences} sequences")
    if not launched:  # spawned CPU ranks, each with ddp's full states at most: the kernel's OOM killer says nothing
        ranks = max(world, args.resume_world or 0)
        per_rank = memory.estimate(case.model, "ddp", 1, case.micro_batch, case.seq_len, bf16=args.dtype == "bf16").total
        if (available := memory.host_available_bytes()) is not None and ranks * per_rank > available:
            raise ValueError(f"{ranks} CPU ranks of {args.model} need about {ranks * per_rank / memory.GiB:.1f} GiB "
                             f"({per_rank / memory.GiB:.1f} GiB each), and this host has {available / memory.GiB:.1f} GiB "
                             "available; use a smaller --model, fewer --world-size ranks, or GPUs under a launcher")
    if launched:
        try:  # on every rank: one that cannot write there stops with the others, before the process group
            Path(args.workdir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--workdir {args.workdir}: {e.strerror}; name a directory every rank can write") from None
    given = {name: getattr(args, name) for name in ("rtol", "atol", "grad_rtol") if getattr(args, name) is not None}
    tol = dataclasses.replace(Tolerance.for_dtype(args.dtype), **given)
    return args, case, engines, tol


def parts(case: Case, engine: str, args: argparse.Namespace, workdir: Path) -> list[Case]:
    """The cases of one engine's run: the whole run, or the part to --resume-at and the resumed rest."""
    if args.resume_at is None:
        return [case.replace(engine=engine)]
    run_dir, world = str(workdir / f"resume-{engine}"), args.resume_world or case.world_size
    rest = case.replace(engine=args.resume_as or engine, world_size=world, accum=case.total_sequences // (case.micro_batch * world),
                        resume=True, run_dir=run_dir)  # the same batch: the accumulation takes up the change of world
    return [case.replace(engine=engine, stop_at=args.resume_at, run_dir=run_dir), rest]


def label(engine: str, args: argparse.Namespace) -> str:
    return engine if args.resume_at is None else f"{engine}->{args.resume_as or engine}"


def run_spawned(case: Case, engines: list[str], args: argparse.Namespace) -> dict[str, Result | str]:
    """No launcher: CPU worlds of worker processes run each engine in turn."""
    from gpt2_scale.harness.pool import WorkerError, WorkerPool

    results: dict[str, Result | str] = {}
    worlds = {case.world_size, args.resume_world or case.world_size}
    with tempfile.TemporaryDirectory() as tmp:
        pools = {w: WorkerPool(w) for w in worlds}
        try:
            for engine in engines:
                try:
                    got = [pools[c.world_size].run(c) for c in parts(case, engine, args, Path(tmp))]
                    results[label(engine, args)] = joined(*got) if len(got) == 2 else got[0]
                except WorkerError as e:
                    results[label(engine, args)] = f"error: {e}"
        finally:
            for pool in pools.values():
                pool.close()
    return results


def run_launched(case: Case, engines: list[str], args: argparse.Namespace, workdir: Path):
    """Under torchrun / deepspeed: every rank runs each engine; rank 0 gets the results.

    The process group is gone when this returns, so rank 0 can train the reference alone.
    """
    from gpt2_scale import distributed
    from gpt2_scale.harness.run import run_engine

    env = distributed.init("auto")
    results = {}
    # A directory of this check's own: an earlier check's checkpoints (a larger --resume-at) are not this one's, and
    # what else is in --workdir is not ours to delete.
    own = Path(distributed.from_main(tempfile.mkdtemp(prefix="check-", dir=workdir) if env.is_main else None))
    try:
        for engine in engines:
            got = [run_engine(c, env, own / "scratch") for c in parts(case, engine, args, own)]
            results[label(engine, args)] = joined(*got) if len(got) == 2 and env.is_main else got[0]
    finally:
        distributed.shutdown()  # on success after a barrier: no rank is still using the directory
        if env.is_main:
            shutil.rmtree(own, ignore_errors=True)
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


@quiet_when_the_reader_left
def main(argv: list[str] | None = None) -> int:
    try:
        args, case, engines, tol = parse_args(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from gpt2_scale.harness.run import reference

    if "RANK" not in os.environ:
        results = run_spawned(case, engines, args)
        return report(case, engines, results, reference(case), tol)
    env, results = run_launched(case, engines, args, Path(args.workdir))
    if not env.is_main:
        return 0
    return report(case, engines, results, reference(case, env.device), tol)


if __name__ == "__main__":
    sys.exit(main())
