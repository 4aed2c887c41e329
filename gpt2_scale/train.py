"""The one training loop: accumulate, clip, step, log, evaluate, checkpoint, for every engine.

A recipe builds a Config and calls ``main(config)``; the command line overrides it.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from gpt2_scale import checkpoint, distributed, strategies
from gpt2_scale.errors import UserError, report
from gpt2_scale.fileio import write_atomic
from gpt2_scale.cli import parse_args
from gpt2_scale.config import Config, ConfigError, config_from_yaml_file, grad_accum_steps
from gpt2_scale.device import enable_tf32
from gpt2_scale.memory import peak_memory
from gpt2_scale.metrics import MetricsLogger, detect_peak_tflops, mfu, step_line
from gpt2_scale.model import GPT
from gpt2_scale.optim import lr_at
from gpt2_scale.step import optimizer_step
from gpt2_scale.zoo import ModelConfig


# A run stopped by SIGTERM/SIGINT checkpoints and exits with this code (EX_TEMPFAIL of sysexits.h), so a
# scheduler tells "preempted: resume me" (75) from "finished" (0), "bad input" (2) and "failed" (1).
EXIT_PREEMPTED = 75


class TrainingError(RuntimeError):
    pass


def resolve_config(defaults: Config, argv: list[str], description: str | None = None) -> Config:
    """Recipe defaults + argv; with --resume, the resumed run's saved config + argv instead.

    A run's cosine length is fixed when it starts (``optim.decay_steps`` = ``train.max_steps`` unless set),
    so resuming with a larger --max-steps trains on at the final learning rate instead of reshaping the
    schedule that the finished steps followed; pass --optim.decay_steps to change it deliberately."""
    cfg = parse_args(defaults, argv, description)
    if cfg.checkpoint.resume:
        run_dir = Path(cfg.checkpoint.resume)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume {run_dir}: not a run directory (no config.yaml)")
        saved = config_from_yaml_file(run_dir / "config.yaml")
        saved.optim.decay_steps = saved.optim.decay_steps or saved.train.max_steps  # runs saved before it was fixed
        cfg = parse_args(saved, argv)
        cfg.log.run_dir = str(run_dir)
    cfg.optim.decay_steps = cfg.optim.decay_steps or cfg.train.max_steps
    return cfg


def main(defaults: Config, argv: list[str] | None = None) -> None:
    """Entry point of every recipe. Exit codes: 0 finished, 2 bad input (one ``error:`` line), 1 training
    failed (a non-finite loss), EXIT_PREEMPTED stopped by a signal after saving a checkpoint."""
    try:
        recipe = sys.modules["__main__"].__doc__  # --help opens with the recipe's own description
        cfg = resolve_config(defaults, sys.argv[1:] if argv is None else argv, recipe)
        summary = train(cfg)
    except (UserError, FileNotFoundError) as e:
        sys.exit(report(e))
    except TrainingError as e:
        sys.exit(report(e, 1))
    if not summary["finished"]:
        sys.exit(EXIT_PREEMPTED)


def build_model(cfg: Config) -> GPT:
    model_cfg = ModelConfig.from_name(cfg.model.name, pad_vocab=cfg.model.pad_vocab)
    if cfg.train.seq_len > model_cfg.block_size:
        raise ConfigError(f"train.seq_len {cfg.train.seq_len} exceeds {model_cfg.name}'s context length {model_cfg.block_size}")
    if cfg.model.init_from:
        from gpt2_scale.hf import load_hf

        model = load_hf(cfg.model.init_from, pad_vocab=cfg.model.pad_vocab)
        if model.config.n_embd != model_cfg.n_embd or model.config.n_layer != model_cfg.n_layer:
            raise ConfigError(f"model.init_from {cfg.model.init_from} is not a {cfg.model.name}; set --model to its size")
        return model
    return GPT(model_cfg)


def open_data(cfg: Config, env: distributed.DistEnv):
    from gpt2_scale.data import TokenLoader, ensure_default_corpus
    from gpt2_scale.data.loader import MANIFEST

    data_dir = ensure_default_corpus() if cfg.data.dir == "default" else Path(cfg.data.dir)
    if cfg.data.prepare_hint and not (data_dir / MANIFEST).is_file():
        raise ConfigError(f"no complete token shards in {data_dir}; prepare them with: {cfg.data.prepare_hint}")
    B, T = cfg.train.micro_batch, cfg.train.seq_len
    train_loader = TokenLoader(data_dir, "train", B, T, env.rank, env.world_size, seed=cfg.data.seed)
    val_loader = TokenLoader(data_dir, "val", B, T, env.rank, env.world_size, seed=cfg.data.seed)
    return train_loader, val_loader


RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints")  # what a run writes into its directory


def check_run_dir(cfg: Config) -> Path:
    """A fresh run refuses a directory where another run wrote anything: nothing recorded is overwritten."""
    run_dir = Path(cfg.log.run_dir)
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if found and not cfg.checkpoint.resume:
        what = f"continue it with --resume {run_dir}" if "checkpoints" in found else f"it has no checkpoint to resume: delete {run_dir} to start over"
        raise ConfigError(f"{run_dir} already holds a run ({', '.join(found)}); {what}, or pass another --run-dir")
    return run_dir


def find_checkpoint(cfg: Config, env: distributed.DistEnv) -> Path | None:
    """With --resume, the run's latest checkpoint, checked to fit this run's settings before anything is written."""
    if not cfg.checkpoint.resume:
        return None
    run_dir = Path(cfg.log.run_dir)
    path = checkpoint.latest(run_dir)
    if path is None:
        raise checkpoint.CheckpointError(f"--resume {run_dir}: no checkpoint there yet; delete {run_dir} and start it again without --resume")
    checkpoint.check_compatible(checkpoint.read_meta(path), path, cfg.to_dict(), env.world_size)
    return path


def restore(strategy, train_loader, path: Path, env: distributed.DistEnv) -> tuple[int, int]:
    """Load engine, data position and RNG from ``path``; returns (step, tokens) reached."""
    state = checkpoint.load(strategy, path, env)
    try:
        train_loader.load_state_dict(state["loader"])
        checkpoint.set_rng_state(state["rng"])
        return int(state["step"]), int(state["tokens"])
    except (KeyError, TypeError, ValueError) as e:
        raise checkpoint.CheckpointError(f"cannot resume from {path}: {e}") from e


def load_hellaswag(cfg: Config):
    if not cfg.log.hellaswag_every:
        return None
    from gpt2_scale.eval.hellaswag import load_examples

    try:
        return load_examples(cfg.log.hellaswag_data, limit=cfg.log.hellaswag_limit)
    except (OSError, RuntimeError, ValueError) as e:
        raise ConfigError(f"HellaSwag: {e}; pass --log.hellaswag_data=PATH, or turn it off with --log.hellaswag_every=0") from e


def write_config(cfg: Config, run_dir: Path, env: distributed.DistEnv) -> None:
    """The run's settings, written once everything they name has been validated and loaded."""
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / "config.yaml", cfg.to_yaml())


@torch.no_grad()
def validation_loss(strategy, loader, cfg: Config, env) -> float:
    """Mean loss over the fixed first val_tokens of the validation split (the same windows every time)."""
    per_batch = cfg.train.micro_batch * cfg.train.seq_len * env.world_size
    n_batches = max(1, cfg.log.val_tokens // per_batch)
    loader.reset()
    strategy.model.eval()
    total = torch.zeros((), device=env.device)
    for _ in range(n_batches):
        x, y = (t.to(env.device) for t in loader.next_batch())
        with strategy.autocast():
            _, loss = strategy.model(x, y)
        total += loss.float()
    strategy.model.train()
    return distributed.all_reduce_mean(total / n_batches).item()


def print_samples(strategy, cfg: Config, env, log: MetricsLogger) -> None:
    from gpt2_scale.generate import generate
    from gpt2_scale.tokenizer import decode, encode

    # Every rank generates (sharded engines gather weights inside forward), with the same seed.
    prompt = torch.tensor([encode(cfg.log.sample_prompt)] * cfg.log.num_samples, device=env.device)
    gen = torch.Generator(device=env.device).manual_seed(cfg.train.seed)
    with strategy.autocast():
        out = generate(strategy.module, prompt, cfg.log.sample_tokens, temperature=1.0, top_k=50, generator=gen)
    for i, row in enumerate(out.tolist()):
        log.print(f"sample {i}: {decode(row)!r}")


def hellaswag(strategy, cfg: Config, env, examples) -> dict:
    from gpt2_scale.eval.hellaswag import evaluate

    return evaluate(strategy.module, examples, env.device, env.rank, env.world_size)


class StopFlag:
    """SIGTERM / Ctrl-C ask the loop to checkpoint and leave at the end of the current step; a second Ctrl-C
    interrupts at once.

    Every step asks all ranks (a one-element all-reduce), so a stop takes one step, well inside a
    scheduler's grace period. The flag travels on the CPU (a gloo group beside NCCL), so asking never
    waits for the GPU's queued work."""

    def __init__(self) -> None:
        self.requested = False
        self._group = None
        if dist.is_initialized() and dist.get_world_size() > 1 and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame) -> None:
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


def due(step: int, every: int, last: bool) -> bool:
    return every > 0 and (step % every == 0 or last)


def train(cfg: Config) -> dict:
    if cfg.engine.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("engine.device=cuda but no CUDA device is visible here; use --engine.device=cpu (or auto)")
    env = distributed.init(cfg.engine.device)
    finished = False
    try:
        summary = _train(cfg, env)  # closes its engine on every way out
        finished = True
        return summary
    finally:
        distributed.shutdown(sync=finished)  # after an error a peer may be gone: no barrier then


def _train(cfg: Config, env: distributed.DistEnv) -> dict:
    """Validate and load everything, and only then write into the run directory and train."""
    resume_from = find_checkpoint(cfg, env)
    accum = grad_accum_steps(cfg, env.world_size)
    run_dir = check_run_dir(cfg)
    if cfg.train.deterministic:
        from gpt2_scale.determinism import make_deterministic

        make_deterministic(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank, for every engine
    enable_tf32(env.device)
    train_loader, val_loader = open_data(cfg, env)
    examples = load_hellaswag(cfg)
    model = build_model(cfg).to(env.device)
    n_params = model.num_params()  # before an engine shards it (ZeRO-3 leaves empty placeholders)
    strategy = strategies.build(cfg, env)
    strategy.setup(model)
    try:
        start_step, tokens = restore(strategy, train_loader, resume_from, env) if resume_from else (0, 0)
        if start_step >= cfg.train.max_steps:
            return already_done(run_dir, start_step, cfg, env)
        write_config(cfg, run_dir, env)
        log = MetricsLogger(run_dir, env.is_main, cfg.log.tensorboard)
        stop = StopFlag()
        try:
            log.print(f"gpt2-scale: {cfg.model.name} ({n_params:,} parameters), engine {cfg.engine.name}, "
                      f"{env.world_size} rank(s) on {env.device.type}, {accum} micro-step(s) per step\n{cfg.to_yaml()}")
            if resume_from is not None:
                log.print(f"resumed from {resume_from} at step {start_step}")
            return loop(cfg, env, strategy, (train_loader, val_loader), examples, log, stop, start_step, tokens)
        finally:
            stop.close()
            log.close()
    finally:
        strategy.close()


def already_done(run_dir: Path, step: int, cfg: Config, env: distributed.DistEnv) -> dict:
    """Resuming a run at or past --max-steps trains nothing and rewrites nothing."""
    if env.is_main:
        print(f"{run_dir} is already at step {step} (--max-steps {cfg.train.max_steps}): nothing to train; "
              "pass a larger --max-steps to go on", flush=True)
    summary = run_dir / "summary.json"
    return json.loads(summary.read_text()) if summary.is_file() else {"step": step - 1, "finished": True}


def loop(cfg: Config, env, strategy, loaders, examples, log: MetricsLogger, stop: StopFlag, start_step: int, tokens: int) -> dict:
    """Steps start_step .. max_steps - 1 with evaluation, logging and checkpoints; returns the run's summary."""
    train_loader, val_loader = loaders
    run_dir = Path(cfg.log.run_dir)
    accum = grad_accum_steps(cfg, env.world_size)
    meta = {"model": cfg.model.name, "pad_vocab": cfg.model.pad_vocab, "engine": cfg.engine.name, "config": cfg.to_dict()}

    def save(step: int) -> Path:
        trainer_state = {"step": step, "tokens": tokens, "loader": train_loader.state_dict(), "rng": checkpoint.rng_state()}
        path = checkpoint.save(strategy, run_dir, step, meta, trainer_state, env, cfg.checkpoint.keep)
        log.print(f"checkpoint: {path}")
        return path

    max_steps = cfg.train.max_steps
    flops_per_token = ModelConfig.from_name(cfg.model.name, pad_vocab=cfg.model.pad_vocab).flops_per_token(cfg.train.seq_len)
    peak = cfg.log.peak_tflops or detect_peak_tflops(env.device)
    avg_dt, t_start = None, time.time()
    window_start, window_steps = time.time(), 0  # steps since the last log line, timed without evaluations
    last_record: dict = {}
    for step in range(start_step, max_steps):
        last = step == max_steps - 1
        evaluating = due(step, cfg.log.val_every, last) or (examples is not None and due(step, cfg.log.hellaswag_every, last))
        evaluating = evaluating or (step > start_step and due(step, cfg.log.sample_every, last))
        if due(step, cfg.log.val_every, last):
            val = validation_loss(strategy, val_loader, cfg, env)
            log.log({"step": step, "tokens": tokens, "val_loss": val})
            log.print(f"step {step:>6} | val loss {val:.4f}")
        if examples is not None and due(step, cfg.log.hellaswag_every, last):
            hs = hellaswag(strategy, cfg, env, examples)
            log.log({"step": step, "tokens": tokens, "hellaswag_acc": hs["acc"], "hellaswag_acc_norm": hs["acc_norm"]})
            log.print(f"step {step:>6} | hellaswag acc {hs['acc']:.4f} acc_norm {hs['acc_norm']:.4f} (n={hs['n']})")
        if step > start_step and due(step, cfg.log.sample_every, last):
            print_samples(strategy, cfg, env, log)

        if evaluating:  # evaluation waited for the device: restart the timing window after it
            window_start, window_steps = time.time(), 0
        lr = lr_at(step, cfg.optim, max_steps)
        batches = (train_loader.next_batch() for _ in range(accum))
        loss_t, norm = optimizer_step(strategy, batches, lr, env.device)
        tokens += cfg.train.total_batch_tokens
        window_steps += 1
        if (step + 1) % cfg.log.log_every == 0 or last:
            loss = loss_t.item()  # the host waits for the device only on log steps
            if not math.isfinite(loss):
                kept = checkpoint.latest(run_dir)
                raise TrainingError(
                    f"non-finite loss ({loss}) at step {step}; stopped without saving. "
                    + (f"The last good checkpoint is {kept}: resume with --resume {run_dir} and a lower --lr." if kept else "No checkpoint was written yet.")
                )
            dt = (time.time() - window_start) / window_steps
            window_start, window_steps = time.time(), 0
            avg_dt = dt if avg_dt is None or step == start_step + 1 else 0.9 * avg_dt + 0.1 * dt
            tps = cfg.train.total_batch_tokens / dt
            record = {
                "step": step, "tokens": tokens, "train_loss": loss, "lr": lr, "grad_norm": float(norm),
                "ms_per_step": 1000 * dt, "tokens_per_s": tps,
                "mfu": mfu(tps / env.world_size, flops_per_token, peak), "peak_mem_gb": peak_bytes(env.device) / 2**30,
            }
            log.log({k: v for k, v in record.items() if v is not None})
            log.print(step_line(record, max_steps, avg_dt * (max_steps - step - 1)))
            last_record = record
        stopping = stop.any_rank()  # every rank asks every step, so all leave after the same one
        if stopping or last or (cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0):
            save(step + 1)
        if stopping:
            log.print(f"stopped by signal after step {step}; continue with --resume {run_dir} (exit code {EXIT_PREEMPTED})")
            break

    summary = {"step": last_record.get("step"), "tokens": tokens, "train_loss": last_record.get("train_loss"),
               "finished": last, "seconds": time.time() - t_start}
    if env.is_main and summary["finished"]:
        write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def peak_bytes(device: torch.device) -> int:
    """CUDA's max allocated, or on CPU the process peak RSS."""
    peak = peak_memory(device)
    return peak.get("allocated", peak.get("rss"))
