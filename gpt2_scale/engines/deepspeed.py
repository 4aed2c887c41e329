"""DeepSpeed ZeRO-1/2/3 (and ZeRO-Offload) through ``deepspeed.initialize`` and a JSON from gpt2_scale/ds_configs/.

The JSON's "auto" fields are filled from our config, and a concrete value that disagrees with our
config is an error: the batch, accumulation, clipping, precision and optimizer settings have one source.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed.checkpoint as dcp

from gpt2_scale.config import Config, ConfigError, grad_accum_steps
from gpt2_scale.device import compile_options
from gpt2_scale.distributed import DistEnv
from gpt2_scale.engines import layout
from gpt2_scale.engines.base import Engine, prepare_model
from gpt2_scale.memory import StateBytes, held_bytes, tensors_in
from gpt2_scale.model import GPT
from gpt2_scale.optim import param_groups

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

DS_CONFIG_DIR = resources.files("gpt2_scale") / "ds_configs"  # package data: found in a checkout and in any install


def default_ds_config_path(cfg: Config) -> Traversable:
    return DS_CONFIG_DIR / f"{cfg.engine.name}{'_offload' if cfg.engine.offload else ''}.json"


def fill_auto(ds: dict, values: dict[str, object], where: str = "") -> dict:
    """Our value at each dotted path of ``values`` that the JSON leaves "auto" or out; refuse a concrete value that
    differs. A JSON may then hold only what is DeepSpeed's own (zero_optimization's settings)."""
    out = {}
    for key, value in ds.items():
        path = f"{where}{key}"
        if isinstance(value, dict):
            out[key] = fill_auto(value, values, path + ".")
        elif value == "auto":
            if path not in values:
                raise ConfigError(f"DeepSpeed config field {path} is 'auto' but gpt2-scale has no value for it; set it explicitly")
            out[key] = values[path]
        else:
            if path in values and _differs(value, values[path]):
                raise ConfigError(
                    f"DeepSpeed config sets {path}={value!r} but the run config implies {values[path]!r}; "
                    f'set it to "auto" in the JSON, or change the run config'
                )
            out[key] = value
    if not where:
        for path, value in values.items():
            *parents, leaf = path.split(".")
            node = out
            for i, name in enumerate(parents):
                node = node.setdefault(name, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"DeepSpeed config field {'.'.join(parents[:i + 1])} must be a JSON object, got {node!r}")
            node.setdefault(leaf, value)
    return out


def _differs(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) != len(b) or any(_differs(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) > 1e-12 * max(1.0, abs(a), abs(b))
    return a != b


SIZES_WE_READ = ("reduce_bucket_size", "stage3_prefetch_bucket_size")


def read_ds_config(path: Path | Traversable, flag: str = "--engine.ds_config") -> dict:
    """A DeepSpeed JSON as a dict, or a ConfigError that names the file and ``flag``, the way to pass another."""
    if not path.is_file():
        what = "is a directory, not a JSON file" if path.is_dir() else "does not exist"
        raise ConfigError(f"DeepSpeed config {path} {what}; pass {flag}=PATH or use a file in {DS_CONFIG_DIR}")
    try:
        ds = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {e}") from e
    if not isinstance(ds, dict) or not isinstance(ds.get("zero_optimization", {}), dict):
        raise ConfigError(f"DeepSpeed config {path} is not a JSON object with a zero_optimization object; pass {flag}=PATH")
    if isinstance(ds.get("fp16"), dict) and ds["fp16"].get("enabled") is True:
        raise ConfigError(f"DeepSpeed config {path} enables fp16, which gpt2-scale does not train in (it has no loss scaling): "
                          "remove its fp16 section; --engine.dtype picks bf16 or fp32")
    for key in SIZES_WE_READ:  # the memory estimate reads them without DeepSpeed's own validation
        value = ds.get("zero_optimization", {}).get(key, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise ConfigError(f"DeepSpeed config {path} sets zero_optimization.{key} to {value!r}; it takes a number of "
                              "elements (e.g. 5e8), or leave it out for DeepSpeed's default")
    if ds.get("zero_optimization", {}).get("memory_efficient_linear") is True:
        raise ConfigError(f"DeepSpeed config {path} sets zero_optimization.memory_efficient_linear, which replaces "
                          "torch.nn.functional.linear in the whole process, and compiled (torch 2.11) its layers get no weight "
                          "gradient; remove it (gpt2-scale turns it off)")
    return ds


def resolve_overlap_comm(ds: dict, world_size: int) -> dict:
    """zero_optimization.overlap_comm "auto" (the shipped ZeRO-2 JSON): on across ranks, off for one. With one rank
    there is no reduction to overlap, and DeepSpeed still waits on its side stream at every backward's end: ZeRO-2's
    step took 1.24x DDP's with it and 1.09x without (GPT-2 124M on an H100, 2026-11-27, docs/benchmarks.md)."""
    zero = ds.get("zero_optimization", {})
    if zero.get("overlap_comm") != "auto":
        return ds
    return {**ds, "zero_optimization": {**zero, "overlap_comm": world_size > 1}}


def build_ds_config(cfg: Config, env: DistEnv, bf16: bool) -> dict:
    ds = read_ds_config(Path(cfg.engine.ds_config) if cfg.engine.ds_config else default_ds_config_path(cfg))
    ds = resolve_overlap_comm(ds, env.world_size)
    accum = grad_accum_steps(cfg, env.world_size)
    o = cfg.optim
    values = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "gradient_accumulation_steps": accum,
        "train_batch_size": cfg.train.micro_batch * accum * env.world_size,
        "gradient_clipping": o.grad_clip,
        "bf16.enabled": bf16,
        "fp16.enabled": False,  # engine.dtype is bf16 or fp32: the loop has no loss scaling
        "optimizer.type": "AdamW",
        "optimizer.params.lr": o.lr,
        "optimizer.params.betas": [o.beta1, o.beta2],
        "optimizer.params.eps": o.eps,
        "optimizer.params.weight_decay": o.weight_decay,
        "optimizer.params.torch_adam": env.device.type != "cuda",  # FusedAdam on CUDA
        "zero_optimization.stage": int(cfg.engine.name.removeprefix("zero")),
        # On (DeepSpeed's default), ZeRO-3 swaps torch.nn.functional.linear for its own autograd.Function, for the
        # whole process and for good: torch 2.11's compile then gives every linear weight a zero gradient, in this
        # run and in any model compiled later in the process (on CPU, and the H200's zero3 divergence of 2026-11-26).
        "zero_optimization.memory_efficient_linear": False,
    }
    return fill_auto(ds, values)


def zero3_sharding_everything(directory: Path) -> Path:
    """Our ZeRO-3 JSON with no parameter kept whole (``stage3_param_persistence_threshold`` 0), written into
    ``directory`` for this rank. The harness and the tests use it: their tiny models lie wholly under DeepSpeed's
    default threshold (1e5 elements), so ZeRO-3 would keep every parameter whole and its gathers go unchecked."""
    ds = json.loads((DS_CONFIG_DIR / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = Path(directory) / f"zero3_sharding_everything_rank{os.environ.get('RANK', '0')}.json"  # no read-while-write
    path.write_text(json.dumps(ds))
    return path


def plain_arch_list(value: str) -> str:
    """TORCH_CUDA_ARCH_LIST with arch suffixes dropped ("9.0a;10.0f+PTX" -> "9.0;10.0+PTX").

    DeepSpeed's JIT builder (0.19) reads each entry as digits and fails on the suffixed entries PyTorch accepts
    and CUDA images set (ValueError: invalid literal for int() ... '0a'). FusedAdam uses no arch-specific
    instruction, so the plain architecture builds the same kernel."""
    entries = []
    for entry in value.replace(";", " ").split():
        plain = re.sub(r"^(\d+\.\d+)[a-z]*", r"\1", entry)
        if plain not in entries:
            entries.append(plain)
    return ";".join(entries)


@contextlib.contextmanager
def arch_list_deepspeed_reads():
    """TORCH_CUDA_ARCH_LIST as DeepSpeed's JIT builder can parse it, for the duration of ``deepspeed.initialize``."""
    value = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if value is None or plain_arch_list(value) == value:
        yield
        return
    os.environ["TORCH_CUDA_ARCH_LIST"] = plain_arch_list(value)
    try:
        yield
    finally:
        os.environ["TORCH_CUDA_ARCH_LIST"] = value


class ZeROEngine(Engine):
    def setup(self, model: GPT) -> None:
        import deepspeed
        import pydantic  # DeepSpeed's config classes

        prepare_model(model, self.cfg.engine, self.runtime, compile_model=False)
        ds_config = self.ds_config = build_ds_config(self.cfg, self.env, self.bf16)
        groups = param_groups(model, self.cfg.optim.weight_decay)
        self._own_attrs = _attributes(model)  # what DeepSpeed adds from here on, close() takes off again
        try:
            with arch_list_deepspeed_reads():  # FusedAdam (CUDA) is JIT-built here on first use
                self.model, self.optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
        except pydantic.ValidationError as e:  # every rank reads the same JSON, and stops here alike
            fields = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise ConfigError(f"DeepSpeed refused its config ({self.cfg.engine.ds_config or 'the shipped JSON'}), in "
                              f"{e.title}: {fields}; fix the JSON") from None
        self.module = self.model.module
        if self.runtime.compile == "model":
            # DeepSpeed's supported way: it compiles engine.module in place (names unchanged) once its ZeRO-3
            # parameter hooks exist; those hooks are torch.compiler.disable'd, so each gathers outside the graph.
            self.model.compile(compile_kwargs=compile_options(self.cfg.engine))

    def _set_sync(self, sync: bool) -> None:
        self.model.set_gradient_accumulation_boundary(sync)

    def close(self) -> None:
        """Destroy the engine (hooks, buffers, DeepSpeed's GC hold) and take back from the model what DeepSpeed
        hung on it: every parameter carries process groups and the engine's optimizer (ZeRO-1/2: ``_dp_group``
        and bound methods of the optimizer; ZeRO-3: ``ds_process_group``, ``_z3_optimizer``, closures over the
        partitioner). A caller still holding the model (a traceback on the error path does) would otherwise keep
        the groups alive past ``distributed.shutdown()``, and their gloo threads into interpreter exit."""
        engine = getattr(self, "model", None)  # None: closed already, or setup failed before an engine existed
        try:
            if engine is not None:
                engine.destroy()
        finally:
            _strip_added_attributes(getattr(self, "_own_attrs", None) or {})
            _clear_deepspeed_caches()
            self._own_attrs = None
            super().close()

    def _backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss, scale_wrt_gas=False)  # the loop already scaled by 1/accumulation

    def step(self) -> torch.Tensor:
        self.model.step()  # clips to gradient_clipping, steps and zeroes at the accumulation boundary
        norm = self.model.get_global_grad_norm()
        return norm if isinstance(norm, torch.Tensor) else torch.tensor(float(norm if norm is not None else "nan"))

    def state_bytes(self) -> StateBytes:
        """Weights: the flat 16-bit (or fp32) buffers, for ZeRO-3 the partitions (``ds_tensor``) plus any full
        parameters gathered or persistent now. Gradients: the reduced ones the optimizer is about to use
        (``averaged_gradients``). Optimizer: the fp32 master partitions and the inner optimizer's state."""
        zero = self.optimizer
        params = [t for p in self.module.parameters() for t in (p.data, getattr(p, "ds_tensor", None))]
        masters = getattr(zero, "single_partition_of_fp32_groups", None) or zero.fp32_partitioned_groups_flat
        grads = tensors_in(zero.averaged_gradients) + [m.grad for m in masters]  # offload: the fp32 .grad on CPU
        inner = tensors_in(list(zero.optimizer.state.values()))
        return StateBytes(held_bytes(params), held_bytes(grads), held_bytes(masters + inner))

    def save(self, path: Path) -> None:
        """The engines' common layout, one parameter at a time: each full fp32 weight and Adam moment is gathered
        from the shards (every rank takes part in each gather) and kept, on the CPU, only by the rank that writes
        it (round robin). No rank holds more than one parameter's full state beyond its share."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        self._materialize_adam_state()
        step, mine = torch.tensor(float(self._adam_step())), {}
        for i, (p, names) in enumerate(_names_by_parameter(self.module).items()):
            full = {layout.model_key(names[0]): safe_get_full_fp32_param(p)}
            full |= {layout.adam_key(names[0], k): safe_get_full_optimizer_state(p, k) for k in layout.MOMENTS}
            if i % self.env.world_size == self.env.rank:
                mine |= {k: v.detach().reshape(_shape(p)).cpu() for k, v in full.items()}
                mine |= {layout.model_key(n): mine[layout.model_key(names[0])] for n in names[1:]}  # tied names
                mine[layout.adam_key(names[0], "step")] = step
        dcp.save(mine, checkpoint_id=path)

    def load(self, path: Path) -> None:
        """Read the common layout a few parameters at a time (every rank reads each one whole) and give each rank
        its shard through DeepSpeed's ``safe_set_full_*``; then refresh the 16-bit copies as DeepSpeed's own
        loader does. Peak host memory beyond the engine: one batch of full parameters and their moments."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        zero, steps = self.optimizer, set()
        self._materialize_adam_state()
        if hasattr(zero, "checkpoint_event_prologue"):  # ZeRO-3: every parameter partitioned while it loads
            zero.checkpoint_event_prologue()
        for batch in _batches(_names_by_parameter(self.module), LOAD_BATCH_BYTES):
            want = {}
            for p, names in batch:
                want[layout.model_key(names[0])] = torch.empty(_shape(p))
                want |= {layout.adam_key(names[0], k): torch.empty(_shape(p)) for k in layout.MOMENTS}
                want[layout.adam_key(names[0], "step")] = torch.empty(())
            dcp.load(want, storage_reader=layout.reader(path))
            for p, names in batch:
                safe_set_full_fp32_param(p, _padded(p, want[layout.model_key(names[0])], self.env.world_size))
                for k in layout.MOMENTS:
                    safe_set_full_optimizer_state(p, _padded(p, want[layout.adam_key(names[0], k)], self.env.world_size), k)
                steps.add(want[layout.adam_key(names[0], "step")].item())
        if len(steps) != 1:
            raise ValueError(f"the checkpoint's parameters have taken different numbers of Adam steps: {sorted(steps)}")
        self._set_adam_step(int(steps.pop()))
        if hasattr(zero, "checkpoint_event_epilogue"):  # ZeRO-3: the 16-bit partitions from the fp32 ones
            for group in range(len(zero.fp16_partitioned_groups_flat)):
                zero._reassign_or_swap_out_partitioned_parameters(group)
            zero.checkpoint_event_epilogue()  # and persistent parameters gathered again
        else:
            zero.update_lp_params()  # ZeRO-1/2: the 16-bit weights from the fp32 partitions, all-gathered

    def _materialize_adam_state(self) -> None:
        """DeepSpeed's Adam creates its state at the first step, as torch's does; ``safe_*_optimizer_state`` need it.
        Create it as DCP does for torch optimizers: one inner step with zero gradients at lr 0, which moves nothing."""
        zero, inner = self.optimizer, self.optimizer.optimizer
        for flat, group in _flat_partitions(zero):
            if inner.state.get(flat):
                continue
            params, lr, grad = group["params"], group["lr"], flat.grad
            group["params"], group["lr"] = [flat], 0.0  # ZeRO-3 puts each partition in its group only for the step
            flat.grad = torch.zeros_like(flat) if grad is None else grad.zero_()  # offload keeps its buffer
            try:
                inner.step()
            finally:
                group["params"], group["lr"], flat.grad = params, lr, grad
        if hasattr(zero, "single_partition_of_fp32_groups"):  # ZeRO-1/2: each parameter's view of the state, linked
            from deepspeed.utils import lazy_init_hp_params_optimizer_state  # again: DeepSpeed may have linked it empty

            for lp_params, flat in zip(zero.bit16_groups, zero.single_partition_of_fp32_groups):
                lazy_init_hp_params_optimizer_state(lp_params, flat, inner.state)

    def _adam_step(self) -> int:
        """Steps DeepSpeed's Adam has taken, kept per flat partition (FusedAdam, CPU Adam and torch AdamW alike)."""
        inner = self.optimizer.optimizer
        steps = {int(inner.state[flat].get("step", 0)) for flat, _ in _flat_partitions(self.optimizer)}
        if len(steps) != 1:
            raise RuntimeError(f"DeepSpeed's optimizer partitions have taken different numbers of steps: {sorted(steps)}")
        return steps.pop()

    def _set_adam_step(self, step: int) -> None:
        inner = self.optimizer.optimizer
        for flat, group in _flat_partitions(self.optimizer):
            old = inner.state[flat].get("step")
            inner.state[flat]["step"] = torch.full_like(old, step) if isinstance(old, torch.Tensor) else step
            if "step" in group:  # FusedAdam's older place for it
                group["step"] = step

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        sd = {}
        for p, names in _names_by_parameter(self.module).items():  # a tied weight under each of its names
            sd |= dict.fromkeys(names, safe_get_full_fp32_param(p).detach().float().cpu())
        return sd

def _flat_partitions(zero) -> list[tuple[torch.Tensor, dict]]:
    """This rank's flat fp32 partitions, each with the inner optimizer's param group it steps in."""
    groups = zero.optimizer.param_groups
    if hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO-3: sub-groups, each mapped to a param group
        return [(flat, groups[zero.sub_group_to_group_id[i]]) for i, flat in enumerate(zero.fp32_partitioned_groups_flat)]
    return list(zip(zero.single_partition_of_fp32_groups, groups))


Snapshot = dict[int, tuple[object, frozenset[str], dict[str, frozenset]]]


def _attributes(model: torch.nn.Module) -> Snapshot:
    """Every module and parameter of ``model``, by id, with the names of its instance attributes and the keys of
    its hook dicts (``_forward_pre_hooks``, ``_forward_hooks``, ..., a tensor's ``_backward_hooks``) now."""
    return {
        id(o): (o, frozenset(vars(o)), {k: frozenset(v) for k, v in vars(o).items() if "hooks" in k and isinstance(v, dict)})
        for o in [*model.modules(), *model.parameters()]
    }


def _strip_added_attributes(before: Snapshot) -> None:
    """Delete from those same objects the instance attributes and hooks added since ``before`` (DeepSpeed's: its
    engine's forward hooks on the root module, for one, are closures over the engine that ``destroy`` leaves)."""
    for o, names, hooks in before.values():
        state = vars(o)
        for name in set(state) - names:
            state.pop(name, None)
        for name, keys in hooks.items():
            table = state.get(name)
            if isinstance(table, dict):
                for key in set(table) - keys:
                    table.pop(key, None)


def _clear_deepspeed_caches() -> None:
    """ZeRO-3's coordinator memoizes ``__params_to_release`` with a class-level lru_cache keyed by the coordinator
    and the submodules: it would keep every destroyed engine's modules (and their groups) for the process's life."""
    import sys

    coordinator = sys.modules.get("deepspeed.runtime.zero.partitioned_param_coordinator")
    cls = getattr(coordinator, "PartitionedParameterCoordinator", None)
    cached = getattr(cls, "_PartitionedParameterCoordinator__params_to_release", None)
    if hasattr(cached, "cache_clear"):
        cached.cache_clear()


LOAD_BATCH_BYTES = 1 << 30  # full fp32 weights and moments read at once while loading


def _names_by_parameter(module: torch.nn.Module) -> dict[torch.nn.Parameter, list[str]]:
    """Each parameter with all its names, first the one its optimizer state goes by (tied weights have two)."""
    names: dict[torch.nn.Parameter, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(p, []).append(name)
    return names


def _shape(p: torch.nn.Parameter) -> torch.Size:
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape  # ZeRO-3 leaves an empty placeholder in p


def _padded(p: torch.nn.Parameter, value: torch.Tensor, world: int) -> torch.Tensor:
    """ZeRO-3 cuts each rank's slice from the flat value padded to ``world`` equal partitions."""
    if not hasattr(p, "ds_id"):
        return value
    return torch.nn.functional.pad(value.flatten(), (0, p.partition_numel() * world - value.numel()))


def _batches(params: dict, budget: int):
    """(parameter, names) pairs in batches of at most ``budget`` bytes of fp32 weights and moments (one at least)."""
    batch, size = [], 0
    for p, names in params.items():
        nbytes = 3 * 4 * _shape(p).numel()
        if batch and size + nbytes > budget:
            yield batch
            batch, size = [], 0
        batch.append((p, names))
        size += nbytes
    if batch:
        yield batch
