"""Teardown: ``Engine.close()`` then ``distributed.shutdown()`` leave no process group alive, for every engine.

A group that outlives the run keeps its gloo worker threads into interpreter exit; a worker that frees its last
collective's tensors only then (a loaded machine delays it) takes the GIL of a finalizing interpreter and is ended
inside a noexcept destructor: "terminate called without an active exception", SIGABRT, and torchrun reports a
finished run as failed. Whether that race hits is up to the scheduler; whether a group survives teardown is not,
so that is what is checked: no gloo thread left on any rank, with the model still referenced (a traceback on the
error path holds it), and a fresh group afterwards in the same process works (DeepSpeed's cached groups of the
old one would be handed to the next engine otherwise).
"""

import json
import logging
import os
from pathlib import Path

import pytest
import torch

ENGINES = ["ddp", "fsdp", "zero1", "zero3"]

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="lists threads through Linux's /proc")


def _backend_threads() -> list[str]:
    """This process's process-group threads by name: gloo's workers and transport loops, the TCP store's."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            names.append(Path(f"/proc/self/task/{tid}/comm").read_text().strip())
        except OSError:
            pass
    return sorted(n for n in names if n.startswith(("pt_gloo", "gloo_", "pt_tcpstore")))


def _worker(rank: int, tmp: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    import torch.distributed as dist

    from gpt2_scale import distributed, engines
    from gpt2_scale.config import Config
    from gpt2_scale.step import optimizer_step
    from gpt2_scale.train import build_model

    report = {}
    for i, name in enumerate(ENGINES):
        # A fresh group per engine, as a bench world or a harness renewal makes (a file store: no port to agree on).
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store-{i}", rank=rank, world_size=2)
        env = distributed.init("cpu")
        cfg = Config()
        cfg.model.name, cfg.engine.name, cfg.engine.compile = "gpt2-tiny", name, False
        cfg.train.micro_batch, cfg.train.seq_len, cfg.train.total_batch_tokens = 1, 16, 32
        torch.manual_seed(0)
        model = engine = None
        during, error = [], None
        try:
            model = build_model(cfg)
            engine = engines.build(cfg, env)
            engine.setup(model)
            x = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(rank))
            optimizer_step(engine, [(x, x)], 1e-3, env.device)
            during = _backend_threads()
        except Exception as e:  # noqa: BLE001 - recorded: both ranks fail alike here (a stale group, say)
            error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        finally:
            if engine is not None:
                engine.close()
            distributed.shutdown()
        report[name] = {"error": error, "during": during, "after": _backend_threads(), "initialized": dist.is_initialized()}
        del model, engine  # only now: the model was held through the teardown
    groups = __import__("sys").modules.get("deepspeed.utils.groups")
    report["deepspeed_world_group"] = repr(getattr(groups, "_WORLD_GROUP", None))
    Path(tmp, f"rank{rank}.json").write_text(json.dumps(report))


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("teardown")
    mp.start_processes(_worker, args=(str(tmp),), nprocs=2, start_method="spawn")
    return [json.loads((tmp / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.parametrize("engine", ENGINES)
def test_close_and_shutdown_leave_no_process_group_thread(reports, engine):
    for rank, report in enumerate(reports):
        got = report[engine]
        assert got["error"] is None, f"rank {rank}: {engine} failed in its fresh group: {got['error']}"
        assert got["during"], f"rank {rank}: {engine} ran without gloo threads, so the check below checks nothing"
        assert got["after"] == [] and not got["initialized"], f"rank {rank}: {engine}: still alive after teardown: {got['after']}"
    assert all(r["deepspeed_world_group"] == "None" for r in reports)  # DeepSpeed's cached clone of the world is gone


def test_shutdown_without_a_group_is_a_no_op():
    import torch.distributed as dist

    from gpt2_scale import distributed

    assert not dist.is_initialized()
    distributed.shutdown()
    distributed.shutdown(sync=True)
    assert distributed.wait_for_idle_backend_threads(timeout=1.0)


def _stops_on_bad_input(rank: int, port: int, tmp: str) -> None:
    import time

    import torch.distributed as dist

    from gpt2_scale import distributed
    from gpt2_scale.errors import UserError

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)  # rank 0 hosts the store
    if rank == 0:
        distributed.announce_failure(UserError("shard x holds token id 60000"), 2)
        distributed.shutdown(sync=False)
        return  # the process exits, and the store with it
    time.sleep(2)  # still busy when rank 0 leaves: it learns of it only at its next collective
    try:
        dist.all_reduce(torch.ones(1))
        seen = "the collective went through"
    except RuntimeError:  # gloo: "Connection closed by peer"
        seen = str(distributed.peer_failure())
    Path(tmp, "rank1.txt").write_text(seen)
    distributed.shutdown(sync=False)


def test_the_rank_that_hosts_the_store_stays_until_its_peers_know_why_it_stopped(tmp_path):
    """Outside torchrun (the deepspeed launcher) rank 0 hosts the store; when it stops on bad input, a peer learns
    of it only once rank 0 has closed its connections, and reads why from that store: so rank 0 must not be gone."""
    import torch.multiprocessing as mp

    from gpt2_scale.distributed import free_port

    mp.start_processes(_stops_on_bad_input, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    assert (tmp_path / "rank1.txt").read_text() == "rank 1 stopped because rank 0 stopped on: shard x holds token id 60000"
