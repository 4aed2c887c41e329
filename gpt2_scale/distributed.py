"""Process-group setup that works the same under torchrun, the deepspeed launcher and plain python."""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import socket
import sys
import threading
import time
import types
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gpt2_scale.device import resolve_device
from gpt2_scale.errors import TrainingError, UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(device: str = "auto") -> DistEnv:
    """Join (or, for a single process, create) the process group: NCCL on CUDA, gloo on CPU.

    Launchers set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; plain ``python`` gets a
    one-process group on a free local port, so every engine also runs as a single process.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = resolve_device(device, "train").type == "cuda"  # "auto": CUDA when visible, else the CPU
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        waiting = threading.Timer(JOIN_NOTICE_S, _still_waiting, (rank, world))
        waiting.daemon = True
        waiting.start()
        try:
            dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world, store=attempt_store(world))
        except ValueError as e:  # RANK and WORLD_SIZE set by hand, without the MASTER_ADDR/MASTER_PORT a launcher sets too
            raise UserError(f"cannot join the process group as rank {rank} of {world} ({e}); start every rank with torchrun or "
                            "deepspeed, or unset RANK and WORLD_SIZE to run one process") from None
        finally:
            waiting.cancel()
    return DistEnv(rank, local_rank, world, dev)


JOIN_NOTICE_S = 60.0  # joining the group waits silently up to its timeout (30 min) for ranks that never start


def _still_waiting(rank: int, world: int) -> None:
    print(f"rank {rank}: still waiting after {JOIN_NOTICE_S:g} s for the other ranks of {world} to join at "
          f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}: start them (the same command on every node), "
          "or unset RANK and WORLD_SIZE to run one process", file=sys.stderr, flush=True)


def attempt_store(world: int) -> dist.Store | None:
    """Under torchrun on one node, the launcher's store with a key prefix of this restart's own; else None (the
    launcher's store as it is).

    torchrun's workers share the TCPStore its agent hosts, and in torch 2.13 a restart (--max-restarts) keeps that
    store with every key the failed attempt wrote (pytorch#135712, #167288): a restarted rank can read the dead
    rank 0's gloo address or NCCL id, and then fails to connect or hangs, at random (most restarts of a 2-rank CPU
    run here). On one node all workers of an attempt share TORCHELASTIC_RESTART_COUNT, so it names their keys apart;
    across nodes each agent counts its own restarts and the counts may differ (pytorch#108158), so there the store
    is left to the launcher (README: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives each attempt a store of its own)."""
    if not _agent_hosts_store() or os.environ.get("GROUP_WORLD_SIZE") != "1":
        return None
    from torch.distributed.constants import default_pg_timeout

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=default_pg_timeout)
    return dist.PrefixStore(f"gpt2_scale/{_attempt()}", store)


def _agent_hosts_store() -> bool:
    """Whether torchrun's agent hosts the process group's store (else rank 0 does, in its own process)."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def _attempt() -> str:
    """This restart of the job (torchrun's count, the same on every rank of one node), as a store key part."""
    return f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


class PeerError(UserError):
    """Another rank left the run on bad input, or on a failure of its own (then with its exit code), while this
    one waited for it in a collective."""

    def __init__(self, message: str, exit_code: int = UserError.exit_code) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _failure_key() -> str:  # per restart: across nodes the launcher's store keeps an earlier attempt's keys
    return f"gpt2_scale/failed/{_attempt()}"


def announce_failure(error: BaseException, exit_code: int) -> None:
    """Leave ``error`` in the process group's store for the other ranks, before this rank leaves the group.

    A rank that stops on bad input only it sees (a corrupt window of the data) leaves its peers inside a collective;
    on gloo that collective fails at once with "Connection closed by peer", a traceback that hides the cause. The
    peers read this in ``peer_failure`` and report the cause instead. Best effort: without a reachable store
    nothing is announced. The rank that hosts the store (rank 0, unless torchrun's agent hosts it) then stays in
    ``shutdown`` until its peers have read it, since the store leaves with its process."""
    global _announced
    if dist.is_initialized() and dist.get_world_size() > 1:
        try:
            store = _store()
            store.set(_failure_key(), f"{exit_code} rank {dist.get_rank()} stopped on: {_one_line(error)}")
            store.set(_knows_key(dist.get_rank()), "")  # it stops on its own error: nothing for it to read
        except Exception:  # noqa: BLE001 - best effort; the rank's own error line still says it
            return
        if _hosts_store():
            _announced = (store, [_knows_key(r) for r in range(dist.get_world_size()) if r != dist.get_rank()])


def _one_line(error: BaseException) -> str:
    """An error in a line: ours are written so; a library's gets its type and its message's first line."""
    if isinstance(error, (UserError, TrainingError)) or type(error).__module__.startswith("gpt2_scale"):
        return str(error)
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"


def peer_failure() -> PeerError | None:
    """What another rank announced before it left, as this rank's error; None when no rank did."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return None
    try:
        store = _store()
        if not store.check([_failure_key()]):
            return None
        code, _, message = store.get(_failure_key()).decode().partition(" ")
    except Exception:  # noqa: BLE001 - the store went with its host: nothing to tell
        return None
    with contextlib.suppress(Exception):
        store.set(_knows_key(dist.get_rank()), "")  # read: the rank that hosts the store may leave
    return PeerError(f"rank {dist.get_rank()} stopped because {message}", int(code) if code.isdigit() else UserError.exit_code)


# The store and the keys of the other ranks, on the rank that hosts the store after it announced a failure.
_announced: tuple[dist.Store, list[str]] | None = None


def _knows_key(rank: int) -> str:
    return f"{_failure_key()}/known_to/{rank}"


def _hosts_store() -> bool:
    """Whether the process group's store lives in this process (and goes when it exits): rank 0's, unless torchrun's
    agent hosts it. Only gloo: an NCCL peer learns nothing from a closed connection, and the launcher ends it."""
    return dist.get_rank() == 0 and dist.get_backend() == "gloo" and not _agent_hosts_store()


def _stay_until_peers_know(timeout: float) -> None:
    """After announcing a failure, keep the store this process hosts until every other rank has read it (or stopped
    on its own), up to ``timeout`` seconds. They learn of the failure when this rank's connections close, in
    ``shutdown``, so this comes after; without it they may find the store gone, and show the collective's traceback."""
    global _announced
    if _announced is None:
        return
    store, keys = _announced
    _announced = None
    try:
        store.wait(keys, datetime.timedelta(seconds=timeout))
    except Exception:  # noqa: BLE001 - a peer that died or never got there: leave anyway
        pass


def _store() -> dist.Store:
    return dist.distributed_c10d._get_default_store()  # the launcher's store (torchrun's agent hosts it)


def shutdown(sync: bool | None = None, timeout: float = 60.0) -> None:
    """Leave the process group and free every process group object of this process before returning.

    Call it last, after ``Engine.close()``, on every way out: success, error and signal. It

    1. waits for the other ranks (``sync``; by default only when no exception is propagating, since after an
       error a peer may be gone or stuck in another collective), so that no rank closes its connections
       while another still has a collective in flight; bounded by ``timeout`` seconds on gloo;
    2. destroys the groups, through ``deepspeed.comm`` when DeepSpeed joined, which also drops the groups
       DeepSpeed caches (``deepspeed.utils.groups``: its cloned world group, data-parallel groups ...);
    3. drops the other references that outlive a group: function defaults captured at import
       (``group=group.WORLD``), DTensor's mesh caches; then collects garbage, so groups only held in reference
       cycles are freed now, and each ProcessGroupGloo's destructor joins its worker threads here;
    4. waits until the gloo worker threads of groups that something still holds are idle (on the error path
       the exception's traceback does: the frames of the failed collective hold their group);
    5. on the rank that hosts the store, after it announced a failure, stays until its peers have read it.

    Why: a gloo worker thread drops its last collective's work, and with it the tensors' Python objects,
    *after* the caller's ``wait()`` returned. A group still alive when Python finalizes leaves that thread
    running; on a loaded machine it can get to that decref only once the interpreter is finalizing, and a
    thread taking the GIL then is ended with ``pthread_exit`` inside a noexcept C++ destructor:
    ``terminate called without an active exception``, SIGABRT, and the launcher reports the finished run
    as failed. Safe to call when no group exists, and twice.
    """
    if sync is None:
        sync = sys.exc_info()[0] is None
    if dist.is_initialized():
        if sync and dist.get_world_size() > 1:
            _barrier(timeout)
        ds_comm = sys.modules.get("deepspeed.comm")
        if ds_comm is not None and ds_comm.is_initialized():
            ds_comm.destroy_process_group()  # torch's destroy, then DeepSpeed's own references to the groups
        else:
            dist.destroy_process_group()
    _release_deepspeed_groups()  # also when someone else destroyed the groups: DeepSpeed's cache outlives them
    _forget_default_groups()
    _clear_torch_caches()
    gc.collect()
    wait_for_idle_backend_threads(timeout)
    _stay_until_peers_know(timeout)


def _barrier(timeout: float) -> None:
    """A barrier that gives up after ``timeout`` on gloo (a peer that died leaves nobody to wait for)."""
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout))
        else:
            dist.barrier()
    except RuntimeError as e:  # a peer left or timed out: tear down anyway, the run's outcome is decided elsewhere
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"distributed.shutdown: rank {dist.get_rank()}: barrier before teardown failed: {first}", file=sys.stderr, flush=True)


def _release_deepspeed_groups() -> None:
    """Drop the process groups DeepSpeed keeps in module globals (only if DeepSpeed was imported)."""
    groups = sys.modules.get("deepspeed.utils.groups")
    release = getattr(groups, "_release_process_group_references", None)
    if release is not None:
        release(None)
    elif groups is not None:  # an older DeepSpeed: the same globals by hand
        for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP", "_MODEL_PARALLEL_GROUP",
                     "_TENSOR_MODEL_PARALLEL_GROUP"):
            if getattr(groups, name, None) is not None:
                setattr(groups, name, None)
        for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_DATA_PARALLEL_GROUP", "_ALL_TO_ALL_GROUP"):
            if isinstance(getattr(groups, name, None), dict):
                getattr(groups, name).clear()


def _forget_default_groups(packages: tuple[str, ...] = ("torch.distributed", "deepspeed")) -> None:
    """Replace process groups captured as default argument values by None (each function's own default group).

    ``def barrier(self, group=torch.distributed.GroupMember.WORLD)`` (DeepSpeed's TorchBackend) or
    ``def all_reduce(tensor, op, group=group.WORLD)`` (torch.distributed.nn.functional) evaluate the default when
    their module is imported: imported while a group exists, the function holds that group for the life of the
    process, past its destruction (and hands the dead group to a call after a new init)."""
    from torch.distributed import ProcessGroup

    def is_group(value) -> bool:
        return issubclass(type(value), ProcessGroup)

    def scrub(fn) -> None:
        if type(fn) in (staticmethod, classmethod):
            fn = fn.__func__
        if type(fn) is not types.FunctionType:  # type(), not isinstance: some module attributes warn when touched
            return
        if fn.__defaults__ and any(map(is_group, fn.__defaults__)):
            fn.__defaults__ = tuple(None if is_group(d) else d for d in fn.__defaults__)
        if fn.__kwdefaults__ and any(map(is_group, fn.__kwdefaults__.values())):
            fn.__kwdefaults__ = {k: None if is_group(d) else d for k, d in fn.__kwdefaults__.items()}

    prefixes = tuple(p + "." for p in packages)
    for name, module in list(sys.modules.items()):
        if module is None or not (name in packages or name.startswith(prefixes)):
            continue
        for value in list(vars(module).values()):
            if issubclass(type(value), type):
                if value.__module__ == name:
                    for member in list(vars(value).values()):
                        scrub(member)
            elif type(value) is types.FunctionType and value.__module__ == name:
                scrub(value)


def _clear_torch_caches() -> None:
    """Empty DTensor's caches (FSDP2's parameters are DTensors): they key on device meshes and sharding specs, and
    a mesh holds its process groups, so each cache would keep the groups of a destroyed world alive. Only the
    modules already imported; losing a cache costs a recomputation in a later world of this process."""
    redistribute = sys.modules.get("torch.distributed.tensor._redistribute")
    if redistribute is not None:
        _call(redistribute, "clear_redistribute_planner_cache")  # its planners hold the mesh their key only weakly refers to
        _call(getattr(redistribute, "_gen_transform_infos", None), "cache_clear")
    collective_utils = sys.modules.get("torch.distributed.tensor._collective_utils")
    if collective_utils is not None:
        _call(getattr(getattr(collective_utils, "MeshTopoInfo", None), "build_from_mesh", None), "cache_clear")
    if "torch.distributed.tensor._sharding_prop" in sys.modules:
        from torch.distributed.tensor import debug

        _call(debug, "_clear_sharding_prop_cache")  # the Python and the C++ fast-path caches of sharding propagation
        prop = sys.modules["torch.distributed.tensor._sharding_prop"]
        _call(getattr(getattr(prop, "ShardingPropagator", None), "_propagate_tensor_meta_cached", None), "cache_clear")


def _call(owner, name: str) -> None:
    fn = getattr(owner, name, None)
    if callable(fn):
        fn()


GLOO_WORKER = "pt_gloo_runloop"  # the name ProcessGroupGloo gives its worker threads (Linux shows it in /proc)


def backend_threads() -> list[str]:
    """Names of this process's live process-group threads (gloo workers and transport loops, NCCL watchdogs);
    empty once every group is freed. Linux only (an empty list elsewhere)."""
    return [name for _, name in _threads() if name.startswith(("pt_gloo", "gloo_", "pt_nccl", "pt_tcpstore"))]


def _threads() -> list[tuple[str, str]]:
    out = []
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                out.append((tid, f.read().strip()))
        except OSError:
            pass  # exited meanwhile
    return out


def _activity(tid: str) -> tuple[str, int] | None:
    """(scheduler state, context switches so far) of one thread, or None once it is gone."""
    try:
        with open(f"/proc/self/task/{tid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
        with open(f"/proc/self/task/{tid}/status") as f:
            switches = sum(int(line.split()[1]) for line in f if "ctxt_switches:" in line)
    except (OSError, IndexError, ValueError):
        return None
    return state, switches


def wait_for_idle_backend_threads(timeout: float = 60.0, interval: float = 0.02) -> bool:
    """Wait until every gloo worker thread still alive is idle, i.e. asleep and not woken for ``interval``.

    A worker asleep on its queue has dropped its last work (it does so before it takes the next); one that
    is runnable, or woke up meanwhile (for the GIL, to free that work's tensors), is not done yet. Needed
    only for groups something still holds after ``shutdown`` destroyed them; True when idle (or none)."""
    deadline = time.monotonic() + timeout
    before: dict[str, tuple[str, int] | None] = {}
    while True:
        workers = [tid for tid, name in _threads() if name == GLOO_WORKER]
        if not workers:
            return True
        now = {tid: _activity(tid) for tid in workers}
        if all(a is None or (a[0] in "SD" and before.get(tid) == a) for tid, a in now.items()):
            return True
        if time.monotonic() > deadline:
            return False
        before = now
        time.sleep(interval)  # releases the GIL, which a worker freeing Python tensors needs


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def share(items: list) -> list:
    """This rank's part of ``items`` (round robin), for work the ranks split: each item goes to exactly one rank."""
    if dist.is_initialized():
        return items[dist.get_rank()::dist.get_world_size()]
    return items


def all_ranks(value: object) -> list:
    """Every rank's ``value`` (a picklable object), in rank order, on every rank."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = [None] * dist.get_world_size()
        dist.all_gather_object(values, value)
        return values
    return [value]


def from_main(value: object) -> object:
    """Rank 0's ``value`` on every rank (a picklable object): a decision only rank 0 can make, taken by all."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        value = box[0]
    return value
