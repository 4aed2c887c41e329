"""The one training loop: accumulate, clip, step, log, evaluate, checkpoint, for every engine.

A recipe builds a Config and calls ``main(config)``; the command line overrides it. The file reads top to
bottom as a run goes: the entry point, setup (everything validated and loaded, nothing written), the loop,
then what the loop calls between steps: evaluation, logging and checkpointing. The optimizer step itself is
``step.optimizer_step``, the function the equivalence harness checks and the bench times.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from gpt2_scale import checkpoint, distributed, engines
from gpt2_scale.cli import parse_args
from gpt2_scale.config import Config, ConfigError, config_from_yaml_file, grad_accum_steps
from gpt2_scale.determinism import make_deterministic, seed_step
from gpt2_scale.device import enable_tf32
from gpt2_scale.engines import Engine
from gpt2_scale.errors import TrainingError, UserError, exit_code, exit_code_recorded, report
from gpt2_scale.fileio import write_atomic
from gpt2_scale.memory import GiB, device_bytes, is_out_of_memory, peak_memory
from gpt2_scale.metrics import MetricsLogger, detect_peak_tflops, mfu, step_line
from gpt2_scale.model import GPT
from gpt2_scale.optim import lr_at, schedule_warning
from gpt2_scale.resume import auto_resume_dir, check_run_dir, check_same_run, claim_run_dir, find_checkpoint, set_aside_earlier_attempt
from gpt2_scale.step import optimizer_step
from gpt2_scale.zoo import ModelConfig

if TYPE_CHECKING:
    from gpt2_scale.data import TokenLoader
    from gpt2_scale.eval.hellaswag import Example

# A run stopped by SIGTERM/SIGINT checkpoints and exits with this code (EX_TEMPFAIL of sysexits.h), so a
# scheduler tells "preempted: resume me" (75) from "finished" (0), "bad input" (2) and "failed" (1).
EXIT_PREEMPTED = 75


# --- entry point ----------------------------------------------------------------------------------------------


def resolve_config(defaults: Config, argv: list[str], description: str | None = None) -> Config:
    """Recipe defaults + argv; with --resume, the resumed run's saved config + argv instead.

    With --checkpoint.auto_resume=true (a job that a launcher or scheduler restarts with the same command), a run
    directory holding a checkpoint is continued as by --resume, once argv is checked to change nothing the run
    depends on (check_same_run); one without a checkpoint is started (check_run_dir). --resume wins over it: an
    explicit resume takes argv's changes, as always.

    A run's cosine length is fixed when it starts (``optim.decay_steps`` = ``train.max_steps`` unless set),
    so resuming with a larger --max-steps trains on at the final learning rate instead of reshaping the
    schedule that the finished steps followed; pass --optim.decay_steps to change it deliberately."""
    cfg = parse_args(defaults, argv, description)
    explicit = cfg.checkpoint.resume
    if resume := explicit or auto_resume_dir(cfg):
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            parent = checkpoint.enclosing_run(run_dir)
            hint = f"; pass the run's directory, {parent} (its checkpoints/latest names the step it resumes from)" if parent else ""
            raise ConfigError(f"--resume {run_dir}: not a run directory (no config.yaml){hint}" if explicit else
                              f"--checkpoint.auto_resume: {run_dir} has a checkpoint but no config.yaml; put the run's config.yaml "
                              "back, or pass another --run-dir")
        saved = config_from_yaml_file(run_dir / "config.yaml")
        saved.optim.decay_steps = saved.optim.decay_steps or saved.train.max_steps  # runs saved before it was fixed
        cfg = parse_args(saved, argv)
        if not explicit:
            check_same_run(saved, cfg, run_dir)
        elif cfg.log.run_dir != saved.log.run_dir and Path(cfg.log.run_dir).resolve() != run_dir.resolve():
            raise ConfigError(f"--resume continues {run_dir} in place, writing its checkpoints there, but --run-dir names "
                              f"{cfg.log.run_dir}; drop --run-dir (to branch off, copy the run directory and resume the copy)")
        cfg.log.run_dir = cfg.checkpoint.resume = str(run_dir)
    cfg.optim.decay_steps = cfg.optim.decay_steps or cfg.train.max_steps
    return cfg


def main(defaults: Config, argv: list[str] | None = None) -> None:
    """Entry point of every recipe. Exit codes: 0 finished, 2 bad input (one ``error:`` line), 1 training
    failed (a non-finite loss, the device's memory, a full disk), EXIT_PREEMPTED stopped by a signal (after saving
    a checkpoint, or before writing anything); rank 0 also leaves its code in ``$GPT2_SCALE_EXIT_FILE``, for job
    scripts under a launcher that replaces it."""
    with exit_code_recorded():
        _main(defaults, argv)


def _main(defaults: Config, argv: list[str] | None) -> None:
    try:
        recipe = sys.modules["__main__"].__doc__  # --help opens with the recipe's own description
        cfg = resolve_config(defaults, sys.argv[1:] if argv is None else argv, recipe)
        summary = train(cfg)
    except (UserError, TrainingError) as e:
        sys.exit(report(e))
    except OSError as e:  # a path that is not there (2), a full disk or a read-only one (1); any other keeps its traceback
        if not (isinstance(e, FileNotFoundError) or e.errno in checkpoint.NO_ROOM):
            raise
        sys.exit(report(e, exit_code(e)))
    except Stopped as e:
        print(e, flush=True)
        sys.exit(EXIT_PREEMPTED)
    if not summary["finished"]:
        sys.exit(EXIT_PREEMPTED)


def train(cfg: Config) -> dict:
    """Train in this process's place in the process group (joined here, left on every way out); the run's summary."""
    if cfg.engine.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("engine.device=cuda but no CUDA device is visible here; use --engine.device=cpu (or auto)")
    env = distributed.init(cfg.engine.device)
    finished = False
    stop = StopFlag()  # from here a signal stops the run: at once until it writes, then after a step and a checkpoint
    try:
        check_ranks_agree(cfg)
        with claim_run_dir(Path(cfg.log.run_dir), env):  # no other run in it from before setup reads it
            summary = _train(cfg, env, stop)  # closes its engine on every way out
        finished = True
        return summary
    except (Exception, Stopped) as e:
        stop.defer()  # leaving already: a signal now must not replace this error with Stopped
        if (peer := caused_by_peer(e)) is not None:
            raise peer from e
        distributed.announce_failure(e, exit_code(e))  # before leaving the group, so that peers waiting for it learn why
        raise
    finally:
        stop.close()
        distributed.shutdown(sync=finished)  # after an error a peer may be gone: no barrier then


def caused_by_peer(error: BaseException) -> distributed.PeerError | None:
    """The failure another rank announced, when this rank's ``error`` follows from it: a collective broke as the peer
    left (a library's error, where ours say what they are), or the launcher stopped this rank with SIGTERM because a
    peer failed (Stopped; reported as exit 75, a scheduler would requeue the peer's bad input for ever)."""
    if isinstance(error, (UserError, TrainingError, OSError)):
        return None
    peer = distributed.peer_failure()
    if isinstance(error, Stopped) and peer is not None and peer.exit_code == EXIT_PREEMPTED:
        return None  # stopped too: a preemption signals every rank
    return peer


def check_ranks_agree(cfg: Config) -> None:
    """Every rank runs rank 0's settings. Each parses its own command line and --config file, so a file edited while
    the ranks started, or a wrapper that changes one rank's arguments, would hang a collective (another micro-batch,
    another --max-steps) or mix two runs silently (another seed); every rank stops on the same line instead."""
    flat = [{f"{section}.{key}": value for section, values in d.items() for key, value in values.items()}
            for d in distributed.all_ranks(cfg.to_dict())]
    for rank, settings in enumerate(flat[1:], start=1):
        if settings.get("checkpoint.resume") != flat[0]["checkpoint.resume"]:  # each decided auto-resume on its own
            raise ConfigError(f"rank {rank} and rank 0 found different checkpoints to resume in {cfg.log.run_dir} "
                              f"({settings.get('checkpoint.resume')} and {flat[0]['checkpoint.resume']}): a save was under way as the "
                              "ranks started, or the nodes' file systems showed them different contents; run the same command again")
        if differ := [key for key, value in flat[0].items() if settings.get(key) != value]:
            key, more = differ[0], f" (and {len(differ) - 1} more)" if len(differ) > 1 else ""
            raise ConfigError(f"rank {rank} runs with {key}={settings.get(key)!r}, rank 0 with {flat[0][key]!r}{more}: launch every rank "
                              "with the same command and --config file")


def _train(cfg: Config, env: distributed.DistEnv, stop: StopFlag) -> dict:
    """Set up, and only once everything is validated and loaded write into the run directory and train."""
    run = setup(cfg, env)
    try:
        return _run(run, stop)
    except RuntimeError as e:  # out of memory, the usual first failure on a GPU: what to change, not a traceback
        if not is_out_of_memory(e):
            raise
        raise out_of_memory(e, run.engine) from None
    finally:
        run.engine.close()


def _run(run: Run, stop: StopFlag) -> dict:
    """Restore, check the first batches, and only then write into the run directory and train."""
    cfg, env = run.cfg, run.env
    if run.resume_from is not None:
        restore(run)
    if run.start_step >= cfg.train.max_steps:
        return already_done(run)
    check_first_batches(run)
    stop.defer()
    aside = set_aside_earlier_attempt(run.dir, run.start_step, env.is_main)
    write_config(run)
    log = MetricsLogger(run.dir, env.is_main, cfg.log.tensorboard)
    try:
        log.print(f"gpt2-scale: {cfg.model.name} ({run.n_params:,} parameters), engine {cfg.engine.name}, "
                  f"{env.world_size} rank(s) on {env.device.type}, {run.accum} micro-step(s) per step\n{cfg.to_yaml()}")
        log.print(run.engine.memory_report(device_bytes(env.device)))
        if warning := schedule_warning(cfg.optim, cfg.train.max_steps):
            log.print(warning)
        if run.resume_from is not None:
            log.print(f"resumed from {run.resume_from} at step {run.start_step}")
        if aside:
            log.print(aside)
        return loop(run, log, stop)
    finally:
        log.close()


def out_of_memory(error: RuntimeError, engine: Engine, building: bool = False) -> TrainingError:
    """The device's out-of-memory error (CUDA's, or the CPU allocator's: memory.is_out_of_memory) as one line: what
    ran out, the estimate for these settings, and the settings that lower the peak, those not already on. ``building``:
    while the weights moved to the device or the engine allocated its states, which only offload, sharding and more
    ranks shrink (not the micro-batch's levers)."""
    cfg, settings = engine.cfg, engine.cfg.engine
    changes = [] if building or cfg.train.micro_batch % 2 else [f"--train.micro_batch={cfg.train.micro_batch // 2} (accumulation keeps the batch)"]
    changes += [flag for flag, on in (("--engine.activation_checkpointing=true", building or settings.activation_checkpointing),
                                      ("--engine.loss_chunk=4096", building or settings.loss_chunk),
                                      ("--engine.offload=true", settings.offload or settings.name == "ddp"),
                                      ("--engine zero3 (or fsdp), which shards the states", not building or settings.name in ("zero3", "fsdp")))
                if not on]
    what = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return TrainingError(f"rank {engine.env.rank} ran out of memory ({what}); these settings have an estimated peak of "
                         f"{engine.memory_estimate().total / GiB:.2f} GiB per rank (tools/estimate_memory.py gives its "
                         f"terms); try {', '.join(changes) or 'more ranks with a sharding engine'}")


# --- setup: validate and load everything, write nothing -------------------------------------------------------


@dataclass
class Run:
    """A run once set up: what the loop and the pieces it calls between steps work on."""

    cfg: Config
    env: distributed.DistEnv
    dir: Path  # the run directory: config.yaml, metrics.jsonl, summary.json, checkpoints/
    engine: Engine  # the model inside its engine, and the optimizer
    train_loader: TokenLoader
    val_loader: TokenLoader | None  # None when log.val_every is 0
    hellaswag: list[Example] | None  # the HellaSwag examples, when log.hellaswag_every is on
    accum: int  # micro-steps per optimizer step
    n_params: int  # of the whole model, counted before an engine sharded it
    resume_from: Path | None  # the checkpoint --resume continues from
    start_step: int = 0  # the first step this process trains: 0, or the step the checkpoint reached
    tokens: int = 0  # tokens trained so far, all ranks together


def setup(cfg: Config, env: distributed.DistEnv) -> Run:
    """Check the settings against the run directory and any checkpoint to resume, seed, open the data, build the
    model and its engine. Nothing is written: a bad setting, file or checkpoint fails here and leaves no trace."""
    resume_from = find_checkpoint(cfg, env.world_size)
    accum = grad_accum_steps(cfg, env.world_size)
    run_dir = check_run_dir(cfg)
    engine = engines.build(cfg, env)  # its settings resolved; it wraps the model below
    if cfg.train.deterministic:
        make_deterministic(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank, for every engine
    enable_tf32(env.device)
    train_loader, val_loader = open_data(cfg, env)
    examples = load_hellaswag(cfg)
    try:
        model = build_model(cfg).to(env.device)
        n_params = model.num_params()  # before an engine shards it (ZeRO-3 leaves empty placeholders)
        engine.setup(model)
    except RuntimeError as e:  # out of memory for the weights, or the states an engine allocates up front (ZeRO's fp32 copies)
        if not is_out_of_memory(e):
            raise
        raise out_of_memory(e, engine, building=True) from None
    return Run(cfg, env, run_dir, engine, train_loader, val_loader, examples, accum, n_params, resume_from)


def build_model(cfg: Config) -> GPT:
    """The run's GPT on the CPU: new (from the seed set before), or from ``model.init_from``, checked to be that size."""
    model_cfg = ModelConfig.from_name(cfg.model.name, pad_vocab=cfg.model.pad_vocab)  # seq_len fits it: config.validate
    if cfg.model.init_from:
        from gpt2_scale.hf import load_hf

        model = load_hf(cfg.model.init_from, pad_vocab=cfg.model.pad_vocab)
        if model.config.n_embd != model_cfg.n_embd or model.config.n_layer != model_cfg.n_layer:
            raise ConfigError(f"model.init_from {cfg.model.init_from} is not a {cfg.model.name}; set --model to its size")
        return model
    return GPT(model_cfg)


def open_data(cfg: Config, env: distributed.DistEnv) -> tuple[TokenLoader, TokenLoader | None]:
    """This rank's train and validation loaders (None without validation); the default corpus is prepared on first use."""
    from gpt2_scale.data import TokenLoader, ensure_default_corpus
    from gpt2_scale.data.loader import MANIFEST, DataError

    data_dir = ensure_default_corpus() if cfg.data.dir == "default" else Path(cfg.data.dir)
    if cfg.data.prepare_hint and not (data_dir / MANIFEST).is_file():
        raise ConfigError(f"no complete token shards in {data_dir}; prepare them with: {cfg.data.prepare_hint}")
    B, T = cfg.train.micro_batch, cfg.train.seq_len
    per_step = cfg.train.total_batch_tokens // T  # a step's windows, the same set at any world size and micro-batch
    train_loader = TokenLoader(data_dir, "train", B, T, env.rank, env.world_size, seed=cfg.data.seed, windows_per_step=per_step)
    if not cfg.log.val_every:
        return train_loader, None  # the val split is not read, and may be empty
    try:
        val_loader = TokenLoader(data_dir, "val", 1, T, seed=cfg.data.seed)  # val_batches splits its windows among the ranks
    except DataError as e:
        raise DataError(f"{e} (or turn validation off: --log.val_every=0)") from None
    return train_loader, val_loader


def load_hellaswag(cfg: Config) -> list[Example] | None:
    """The HellaSwag examples when the run evaluates them, read (or downloaded) before anything is written."""
    if not cfg.log.hellaswag_every:
        return None
    from gpt2_scale.eval.hellaswag import load_examples

    try:
        return load_examples(cfg.log.hellaswag_data, limit=cfg.log.hellaswag_limit)
    except (OSError, RuntimeError, ValueError) as e:
        raise ConfigError(
            f"HellaSwag: {e}; fetch it into the cache where there is network (`python tools/prepare_data.py hellaswag`), "
            "pass --log.hellaswag_data=PATH, or turn it off with --log.hellaswag_every=0"
        ) from e


def check_first_batches(run: Run) -> None:
    """Read what the first step trains on, and the batches every validation reads, on every rank: bad data there
    stops all ranks with one line before the run writes anything, so the run starts clean once the data is mended
    (a run that wrote its config.yaml is refused a fresh start in the same directory)."""
    from gpt2_scale.data.loader import DataError

    error = None
    try:
        run.train_loader.check_ahead(run.accum)
        if run.val_loader is not None:
            for _ in val_batches(run):
                pass
    except DataError as e:
        error = str(e)
    if failed := next((e for e in distributed.all_ranks(error) if e), None):  # every rank stops, each with the same line
        raise DataError(failed)


def write_config(run: Run) -> None:
    """The run's settings, written once everything they name has been validated and loaded. Not checkpoint.resume,
    which says how this attempt started rather than what the run is: the file also serves as a template
    (``--config RUN/config.yaml --run-dir NEW``), which would otherwise continue RUN."""
    if run.env.is_main:
        run.dir.mkdir(parents=True, exist_ok=True)
        settings = dataclasses.replace(run.cfg, checkpoint=dataclasses.replace(run.cfg.checkpoint, resume=None))
        write_atomic(run.dir / "config.yaml", settings.to_yaml())


def already_done(run: Run) -> dict:
    """Resuming a run at or past --max-steps trains nothing and rewrites nothing."""
    if run.env.is_main:
        print(f"{run.dir} is already at step {run.start_step} (--max-steps {run.cfg.train.max_steps}): nothing to train; "
              "pass a larger --max-steps to go on, or another --run-dir to start a new run", flush=True)
    try:
        summary = json.loads((run.dir / "summary.json").read_text())
    except (OSError, ValueError):  # none (it stopped at --max-steps by a signal), or a damaged one: left as it is
        summary = None
    return summary if isinstance(summary, dict) and "finished" in summary else {"step": run.start_step - 1, "finished": True}


# --- the loop ------------------------------------------------------------------------------------------------


def loop(run: Run, log: MetricsLogger, stop: StopFlag) -> dict:
    """Steps start_step .. max_steps - 1: before each, the evaluations due; after it, its log line and the checkpoint
    due. Returns the run's summary."""
    cfg, env = run.cfg, run.env
    max_steps = cfg.train.max_steps
    progress = Progress(run, log)
    for step in range(run.start_step, max_steps):
        last = step == max_steps - 1
        if evaluate(run, step, last, log):
            progress.restart()  # evaluation waited for the device: time the steps without it
        lr = lr_at(step, cfg.optim, max_steps)
        batches = (run.train_loader.next_batch() for _ in range(run.accum))
        seed_step(cfg.train.seed, step, env.rank)
        loss, norm = optimizer_step(run.engine, batches, lr, env.device)
        run.tokens += cfg.train.total_batch_tokens
        progress.step_done(step, loss, norm, lr, last)
        stopping = stop.any_rank()  # every rank asks every step, so all leave after the same one
        if stopping or last or (cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0):
            for what, value in (("loss", loss), ("gradient norm", norm)):  # never save what a non-finite step updated
                if not math.isfinite(float(value)):
                    raise non_finite(run, step, what, float(value))
            save(run, step + 1, log)
        if stopping and not last:  # at the last step it has finished: exit 0
            again = "run the same command again" if cfg.checkpoint.auto_resume else f"continue with --resume {run.dir}"
            log.print(f"stopped by signal after step {step}; {again} (exit code {EXIT_PREEMPTED})")
            break
    return progress.summary(finished=last)


class Stopped(BaseException):  # not an Exception: no handler of setup's may take it for a failure of its own
    """SIGTERM or Ctrl-C before a run wrote anything: nothing to save, so it stops at once."""

    exit_code = EXIT_PREEMPTED


class StopFlag:
    """SIGTERM / Ctrl-C before the run writes anything stop it at once (``Stopped``, exit 75: setup, a long
    build of DeepSpeed's ops or a checkpoint's load may take minutes, more than a scheduler's grace period). From ``defer()`` on,
    they ask the loop to checkpoint and leave at the end of the current step; a second Ctrl-C interrupts at once.

    Every step asks all ranks (a one-element all-reduce), so a stop takes one step, well inside a
    scheduler's grace period. The flag travels on the CPU (a gloo group beside NCCL), so asking never
    waits for the GPU's queued work."""

    def __init__(self) -> None:
        self.requested = self.deferred = False
        self._group = None
        if dist.is_initialized() and dist.get_world_size() > 1 and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def defer(self) -> None:
        self.deferred = True

    def _handle(self, signum, frame) -> None:
        if not self.deferred:
            raise Stopped(f"stopped by {signal.Signals(signum).name} before training began; nothing was written: "
                          "run the same command again")
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def any_rank(self) -> bool:
        flag = torch.tensor([float(self.requested)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._group = None  # distributed.shutdown destroys it with the others; no reference may keep it alive


# --- evaluation, before a step -----------------------------------------------------------------------------


def due(step: int, every: int, last: bool) -> bool:
    return every > 0 and (step % every == 0 or last)


def evaluate(run: Run, step: int, last: bool, log: MetricsLogger) -> bool:
    """The validation loss, HellaSwag and samples due before ``step`` (samples not before a run's first step);
    True when any ran."""
    cfg = run.cfg
    ran = False
    if due(step, cfg.log.val_every, last):
        val = validation_loss(run)
        log.log({"step": step, "tokens": run.tokens, "val_loss": val})
        log.print(f"step {step:>6} | val loss {val:.4f}")
        ran = True
    if run.hellaswag is not None and due(step, cfg.log.hellaswag_every, last):
        from gpt2_scale.eval.hellaswag import evaluate as hellaswag

        hs = hellaswag(run.engine.module, run.hellaswag, run.env.device, run.env.rank, run.env.world_size)
        log.log({"step": step, "tokens": run.tokens, "hellaswag_acc": hs["acc"], "hellaswag_acc_norm": hs["acc_norm"]})
        log.print(f"step {step:>6} | hellaswag acc {hs['acc']:.4f} acc_norm {hs['acc_norm']:.4f} (n={hs['n']})")
        ran = True
    if step > run.start_step and due(step, cfg.log.sample_every, last):
        print_samples(run, log)
        ran = True
    return ran


def val_windows(cfg: Config, loader: TokenLoader) -> int:
    """How many windows a validation reads: the first log.val_tokens of the split in whole windows (at least one, at
    most the split). The same at any number of ranks and micro-batch, so val loss compares across runs and resumes."""
    return min(max(1, cfg.log.val_tokens // cfg.train.seq_len), loader.num_windows)


def val_batches(run: Run) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """This rank's (x, y, rows) of the validation windows, micro_batch rows at a time. Every rank reads as many
    batches (a sharded engine's forward is collective); rows past the last window repeat it with targets -1
    (ignored by the loss), and ``rows`` counts those that are not."""
    B, rank, world = run.cfg.train.micro_batch, run.env.rank, run.env.world_size
    n = val_windows(run.cfg, run.val_loader)
    for start in range(0, n, B * world):
        positions = start + rank * B + np.arange(B)
        x, y = run.val_loader.batch_at(np.minimum(positions, n - 1))
        past = torch.from_numpy(positions >= n)
        if past.any():
            y = y.clone()  # a view of the same tokens as x
            y[past] = -1
        yield x, y, B - int(past.sum())


@torch.no_grad()
def validation_loss(run: Run) -> float:
    """Mean loss over the fixed first val_tokens of the validation split (the same windows every time, and on any
    number of ranks)."""
    env, engine = run.env, run.engine
    engine.model.eval()
    total = torch.zeros((), device=env.device)
    for x, y, rows in val_batches(run):
        with engine.autocast():
            _, loss = engine.model(x.to(env.device), y.to(env.device))
        if rows:  # a batch of ignored rows only has the loss 0/0
            total += loss.float() * rows
    engine.model.train()
    return (distributed.all_reduce_mean(total) * env.world_size / val_windows(run.cfg, run.val_loader)).item()


def print_samples(run: Run, log: MetricsLogger) -> None:
    """Continuations of log.sample_prompt, under the engine's autocast (device.py's table)."""
    from gpt2_scale.generate import generate
    from gpt2_scale.tokenizer import decode, encode

    cfg, env, engine = run.cfg, run.env, run.engine
    # Every rank generates (sharded engines gather weights inside forward), with the same seed.
    prompt = torch.tensor([encode(cfg.log.sample_prompt)] * cfg.log.num_samples, device=env.device)
    gen = torch.Generator(device=env.device).manual_seed(cfg.train.seed)
    with engine.autocast():
        out = generate(engine.module, prompt, cfg.log.sample_tokens, temperature=1.0, top_k=50, generator=gen)
    for i, row in enumerate(out.tolist()):
        log.print(f"sample {i}: {decode(row)!r}")


# --- logging, after a step -----------------------------------------------------------------------------------


class Progress:
    """The training-loss line of every log step (loss, learning rate, gradient norm, time per step, tokens/s, MFU,
    peak memory, ETA) to stdout, metrics.jsonl and TensorBoard; at the end, the run's summary.

    Time per step is averaged over the steps since the last line, evaluations left out. The loss is read from the
    device only on log steps, and a non-finite one stops the run there."""

    def __init__(self, run: Run, log: MetricsLogger) -> None:
        cfg = run.cfg
        self.run, self.log = run, log
        self.flops_per_token = ModelConfig.from_name(cfg.model.name, pad_vocab=cfg.model.pad_vocab).flops_per_token(cfg.train.seq_len)
        self.peak_tflops = cfg.log.peak_tflops or detect_peak_tflops(run.env.device)
        self.avg_dt: float | None = None
        self.started = time.time()
        self.restart()
        self.last_record: dict = {}

    def restart(self) -> None:
        """Start a new timing window."""
        self.window_start, self.window_steps = time.time(), 0

    def step_done(self, step: int, loss_t: torch.Tensor, norm: torch.Tensor, lr: float, last: bool) -> None:
        run, cfg = self.run, self.run.cfg
        self.window_steps += 1
        if not ((step + 1) % cfg.log.log_every == 0 or last):
            return
        loss = loss_t.item()  # the host waits for the device only on log steps
        if not math.isfinite(loss):
            raise non_finite(run, step, "loss", loss)
        dt = (time.time() - self.window_start) / self.window_steps
        self.restart()
        self.avg_dt = dt if self.avg_dt is None or step == run.start_step + 1 else 0.9 * self.avg_dt + 0.1 * dt
        tps = cfg.train.total_batch_tokens / dt
        record = {
            "step": step, "tokens": run.tokens, "train_loss": loss, "lr": lr, "grad_norm": float(norm),
            "ms_per_step": 1000 * dt, "tokens_per_s": tps,
            "mfu": mfu(tps / run.env.world_size, self.flops_per_token, self.peak_tflops),
            "peak_mem_gb": peak_bytes(run.env.device) / 2**30,
        }
        self.log.log({k: v for k, v in record.items() if v is not None})
        self.log.print(step_line(record, cfg.train.max_steps, self.avg_dt * (cfg.train.max_steps - step - 1)))
        self.last_record = record

    def summary(self, finished: bool) -> dict:
        """The run's outcome; a finished run also leaves it in summary.json."""
        summary = {"step": self.last_record.get("step"), "tokens": self.run.tokens, "train_loss": self.last_record.get("train_loss"),
                   "finished": finished, "seconds": time.time() - self.started}
        if self.run.env.is_main and finished:
            write_atomic(self.run.dir / "summary.json", json.dumps(summary, indent=2))
        return summary


def non_finite(run: Run, step: int, what: str, value: float) -> TrainingError:
    """The error that stops a run at a non-finite loss or gradient norm, naming the checkpoint to go back to."""
    kept = checkpoint.latest(run.dir)
    return TrainingError(
        f"non-finite {what} ({value}) at step {step}; stopped without saving. "
        + (f"The last good checkpoint is {kept}: resume with --resume {run.dir} and a lower --lr."
           if kept else "No checkpoint was written yet.")
    )


def peak_bytes(device: torch.device) -> int:
    """CUDA's max allocated, or on CPU the process peak RSS."""
    peak = peak_memory(device)
    return peak.get("allocated", peak.get("rss"))


# --- checkpointing, after a step -------------------------------------------------------------------------------


def save(run: Run, step: int, log: MetricsLogger) -> Path:
    """A checkpoint after ``step`` optimizer steps: the engine's state, and the position in the global data order."""
    cfg = run.cfg
    meta = {"model": cfg.model.name, "pad_vocab": cfg.model.pad_vocab, "engine": cfg.engine.name, "config": cfg.to_dict()}
    trainer_state = {"step": step, "tokens": run.tokens, "loader": run.train_loader.state_dict()}
    path = checkpoint.save(run.engine, run.dir, step, meta, trainer_state, run.env, cfg.checkpoint.keep)
    log.print(f"checkpoint: {path}")
    return path


def restore(run: Run) -> None:
    """Load the engine and the data position from the checkpoint to resume; the run goes on from its step (any RNG
    state a legacy checkpoint holds is not needed: determinism.seed_step)."""
    from gpt2_scale.data.loader import DataError

    path = run.resume_from
    state = checkpoint.load(run.engine, path)
    try:
        run.train_loader.load_state_dict(state["loader"])
        run.start_step, run.tokens = int(state["step"]), int(state["tokens"])
    except DataError as e:  # this data is not the run's
        saved = checkpoint.read_meta(path).get("config", {}).get("data", {}).get("dir")
        raise DataError(f"cannot resume from {path}: {e}; resume with the run's data" + (f", --data {saved}" if saved else "")) from e
    except (KeyError, TypeError, ValueError) as e:
        raise checkpoint.CheckpointError(f"cannot resume from {path}: {e}") from e
    if run.start_step != checkpoint.read_meta(path)["step"]:  # the two files of one save disagree
        raise checkpoint.CheckpointError(f"cannot resume from {path}: its {checkpoint.TRAINER_FILE} says step {run.start_step} and "
                                         "its meta.json another; the checkpoint is damaged, resume from an earlier one")
