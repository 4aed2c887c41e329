"""Train a case: under an engine on every rank of a process group, or as the single-process reference.

Both drive ``gpt2_scale.step.optimizer_step``, the function the training loop uses, so the harness
checks the real step. The reference is a plain model with the same AdamW on one process that sees the
whole total batch at once (one micro-batch of all sequences): any correct split of that batch over
micro-steps and ranks must give the same losses, norms and weights. The reference also records what
its AdamW saw at every step, which is how compare.py knows how far rounding can move each weight.
"""

from __future__ import annotations

import dataclasses
import gc
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2_scale import checkpoint, engines
from gpt2_scale.determinism import make_deterministic
from gpt2_scale.distributed import DistEnv, barrier
from gpt2_scale.engines import layout
from gpt2_scale.engines.base import Engine, adamw
from gpt2_scale.engines.deepspeed import zero3_sharding_everything
from gpt2_scale.harness.case import Case, eval_batch, rank_batches, run_config, tokens
from gpt2_scale.model import GPT
from gpt2_scale.optim import param_groups
from gpt2_scale.step import optimizer_step


@dataclass
class Result:
    losses: list[float]
    grad_norms: list[float]
    weights: dict[str, torch.Tensor]  # full fp32 weights after the last step
    logits: torch.Tensor  # of eval_batch, from the trained model
    model_logits: torch.Tensor  # the same from the plain model holding ``weights``: what ``logits`` must be
    exported_logits: torch.Tensor | None = None  # the same, after export and load under case.export_to
    adam: dict[str, list[AdamStep]] | None = None  # the reference's only: its optimizer, per weight and step


@dataclass
class AdamStep:
    """What the reference's AdamW saw of one parameter in one step; compare.py bounds an engine's weights with it."""

    lr: float
    eps: float
    max_grad: float  # the largest |gradient| in the tensor, after clipping
    m: torch.Tensor  # bias-corrected first moment
    d: torch.Tensor  # the update's denominator: sqrt(bias-corrected second moment) + eps


class PlainEngine(Engine):
    """No engine at all: the model and torch AdamW on one process, the yardstick for every engine."""

    def setup(self, model: GPT) -> None:
        self.model = self.module = model
        self.optimizer = adamw(param_groups(model, self.cfg.optim.weight_decay), self.cfg, self.env.device)

    def autocast(self):
        return self.runtime.autocast()

    def _set_sync(self, sync: bool) -> None:
        pass

    def save(self, path: Path) -> None:
        torch.save(self.module.state_dict(), path / "model.pt")

    def load(self, path: Path) -> None:
        self.module.load_state_dict(torch.load(path / "model.pt", weights_only=True))


def initial_model(case: Case, device: torch.device, seed_offset: int = 0) -> GPT:
    torch.manual_seed(case.seed + seed_offset)
    return GPT(case.model).to(device)


def reference(case: Case, device: torch.device | None = None) -> Result:
    """The case on one plain process in fp32, the whole total batch as one micro-batch, with the plain
    (full logits) loss whatever ``case.loss_chunk``, so a fused-loss case is checked against it."""
    device = device or torch.device("cpu")
    ref = case.replace(dtype="fp32", loss_chunk=0)
    env = DistEnv(0, 0, 1, device)
    engine = PlainEngine(run_config(ref), env)
    engine.setup(initial_model(ref, device))
    adam: dict[torch.Tensor, list[AdamStep]] = {}
    engine.optimizer.register_step_post_hook(lambda optimizer, *_: record_adam_step(optimizer, adam))
    losses, norms = [], []
    for step, step_tokens in enumerate(tokens(ref)):
        batch = [(step_tokens[:, :-1], step_tokens[:, 1:])]
        loss, norm = optimizer_step(engine, batch, ref.lr_at(step), device)
        losses.append(loss.item())
        norms.append(float(norm))
    named = engine.module.state_dict(keep_vars=True)  # the tied weight under both of its names
    logits = _logits(engine, ref, device)
    return Result(losses, norms, engine.full_state_dict(), logits, logits, adam={name: adam[p] for name, p in named.items()})


@torch.no_grad()
def record_adam_step(optimizer: torch.optim.AdamW, steps: dict[torch.Tensor, list[AdamStep]]) -> None:
    """An AdamW step post-hook: append each parameter's AdamStep (its gradient is still there: zero_grad comes after)."""
    for group in optimizer.param_groups:
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            state = optimizer.state[p]
            t = state["step"].item()
            m = state["exp_avg"] / (1 - beta1**t)
            d = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt() + group["eps"]
            steps.setdefault(p, []).append(AdamStep(group["lr"], group["eps"], p.grad.abs().max().item(), m.cpu(), d.cpu()))


def plain_logits(case: Case, weights: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """The eval batch's logits from a plain model holding ``weights``, under the case's dtype."""
    engine = PlainEngine(run_config(case), DistEnv(0, 0, 1, device))
    engine.setup(GPT(case.model).to(device))
    engine.module.load_state_dict(weights)
    return _logits(engine, case, device)


@torch.no_grad()
def _logits(engine: Engine, case: Case, device: torch.device) -> torch.Tensor:
    """Forward on every rank (sharded engines gather inside it); the eval batch's fp32 logits on CPU."""
    engine.model.eval()
    with engine.autocast():
        logits, _ = engine.model(eval_batch(case).to(device))
    engine.model.train()
    return logits.float().cpu()


def _build(case: Case, name: str, env: DistEnv, model: GPT, workdir: Path) -> Engine:
    cfg = run_config(case, name, env.device.type)
    if name == "zero3":  # sharded for real: a tiny model would otherwise be kept whole
        cfg.engine.ds_config = str(zero3_sharding_everything(workdir))
    engine = engines.build(cfg, env)
    engine.setup(model)
    return engine


def joined(first: Result, rest: Result) -> Result:
    """A run stopped at a checkpoint (``case.stop_at``) and its resumed rest, as one run's Result."""
    return dataclasses.replace(rest, losses=first.losses + rest.losses, grad_norms=first.grad_norms + rest.grad_norms)


def plant(fault: str | None, engine: Engine) -> None:
    """Planted resume bugs, to show the resume property fails when resuming is wrong. "drop_adam_moments": the
    conversion lost Adam's moments (fresh zeros, as a new optimizer has). "restart_data" is applied by the caller."""
    if fault == "drop_adam_moments":
        optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # DeepSpeed's inner optimizer
        for state in optimizer.state.values():
            for moment in layout.MOMENTS:
                state[moment].zero_()


def teardown(engine: Engine) -> None:
    """Free an engine before the next one."""
    engine.close()
    engine.model = engine.module = engine.optimizer = None  # the caller may still hold the shell
    gc.collect()


def run_engine(case: Case, env: DistEnv, workdir: Path) -> Result | None:
    """Every rank calls; rank 0 returns the Result, the others None.

    With ``case.deterministic`` the run uses PyTorch's deterministic algorithms (as
    ``train.deterministic`` does); the previous setting is restored after, since a pool runs many cases.

    ``case.stop_at`` and ``case.resume`` split a run in two, as a job moved to other hardware is: the first part
    saves a checkpoint and returns its losses and norms; the second, under any engine, world size and split,
    starts from other initial weights (so only the checkpoint can make it right), takes the step and the data
    position from the checkpoint, and trains to the end.
    """
    previous = torch.are_deterministic_algorithms_enabled()
    if case.deterministic:
        make_deterministic(case.seed)
    try:
        return _run_engine(case, env, workdir)
    finally:
        torch.use_deterministic_algorithms(previous)


def _run_engine(case: Case, env: DistEnv, workdir: Path) -> Result | None:
    if env.is_main:
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
    barrier()
    meta = {"model": case.model.name, "pad_vocab": case.model.pad_vocab, "engine": case.engine}
    engine = _build(case, case.engine, env, initial_model(case, env.device, seed_offset=int(case.resume)), workdir)
    start, position = 0, 0  # the first step, and the index of its batch in the run's tokens
    if case.resume:
        state = checkpoint.load(engine, checkpoint.latest(Path(case.run_dir)))
        start, position = state["step"], state["position"]
        plant(case.fault, engine)
        position = 0 if case.fault == "restart_data" else position
    all_tokens, losses, norms = tokens(case), [], []
    for step in range(start, case.steps):
        if step == case.stop_at:
            checkpoint.save(engine, Path(case.run_dir), step, meta, {"step": step, "position": position}, env, keep=1)
            teardown(engine)
            return Result(losses, norms, {}, torch.empty(0), torch.empty(0)) if env.is_main else None
        batches = rank_batches(all_tokens[position], case.micro_batch, case.accum, env.world_size, env.rank)
        loss, norm = optimizer_step(engine, batches, case.lr_at(step), env.device)
        losses.append(loss.item())
        norms.append(float(norm))
        position += 1
    weights = engine.full_state_dict()  # complete on rank 0 only
    logits = _logits(engine, case, env.device)
    model_logits = plain_logits(case, weights, env.device) if env.is_main else None
    exported = None
    if case.export_to:
        path = checkpoint.save(engine, workdir, case.steps, meta, {"step": case.steps}, env, keep=1)
        teardown(engine)
        model = initial_model(case, env.device, seed_offset=2)
        checkpoint.load_weights(model, engines.read_full_weights(path), path)
        engine = _build(case, case.export_to, env, model, workdir)
        exported = _logits(engine, case, env.device)
    teardown(engine)
    barrier()
    if env.is_main:
        shutil.rmtree(workdir, ignore_errors=True)
        return Result(losses, norms, weights, logits, model_logits, exported)
    return None
