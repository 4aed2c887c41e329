"""TokenLoader: rank disjointness and coverage, determinism, resume, fixed validation order, errors."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from launch import env

from gpt2_scale import tokenizer
from gpt2_scale.data import DataError, TokenLoader, read_manifest
from gpt2_scale.data.loader import FORMAT_VERSION, MANIFEST
from gpt2_scale.errors import UserError
from gpt2_scale.fileio import sha256

REPO = Path(__file__).resolve().parents[1]


def make_shards(root: Path, train: list[int], val: list[int], seed: int = 0) -> Path:
    """Shards of random token ids with the given lengths and a finished manifest in the real schema."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    shards = {}
    for split, sizes in (("train", train), ("val", val)):
        shards[split] = []
        for i, n in enumerate(sizes):
            file = f"{split}_{i:06d}.bin"
            rng.integers(0, tokenizer.VOCAB_SIZE, n, dtype=np.uint16).tofile(root / file)
            shards[split].append({"file": file, "tokens": n, "documents": 1})
    manifest = {
        "format": FORMAT_VERSION,
        "complete": True,
        "source": {"kind": "test"},
        "tokenizer": {"name": tokenizer.NAME, "hash": tokenizer.HASH, "vocab_size": tokenizer.VOCAB_SIZE},
        "dtype": "uint16",
        "shard_tokens": max(train + val),
        "val_tokens": None,
        "command": "make_shards",
        "shards": shards,
        "tokens": {k: sum(s["tokens"] for s in v) for k, v in shards.items()},
        "documents": len(train) + len(val),
    }
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root


def shard_tokens(root: Path, split: str) -> list[np.ndarray]:
    m = read_manifest(root)
    return [np.fromfile(root / s["file"], dtype=np.uint16) for s in m["shards"][split]]


def epoch_windows(loaders: list[TokenLoader]) -> list[tuple[int, int]]:
    """Every window the ranks read in one epoch, checking each batch against the shard bytes."""
    shards = shard_tokens(loaders[0].data_dir, loaders[0].split)
    T = loaders[0].T
    seen = []
    for _ in range(loaders[0].batches_per_epoch):
        for loader in loaders:
            ids = loader.window_ids()
            x, y = loader.next_batch()
            expected = np.stack([shards[s][w * T : w * T + T + 1] for s, w in ids]).astype(np.int64)
            assert torch.equal(x, torch.from_numpy(expected[:, :-1]))
            assert torch.equal(y, torch.from_numpy(expected[:, 1:]))
            seen += ids
    return seen


@settings(max_examples=40, deadline=None)
@given(
    world_size=st.integers(1, 4),
    B=st.integers(1, 4),
    T=st.integers(1, 12),
    sizes=st.lists(st.integers(1, 120), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_ranks_are_disjoint_and_cover_the_epoch(tmp_path_factory, world_size, B, T, sizes, seed):
    root = make_shards(tmp_path_factory.mktemp("d"), train=sizes, val=[50], seed=seed)
    all_windows = {(s, w) for s, n in enumerate(sizes) for w in range(max(0, (n - 1) // T))}
    if len(all_windows) < B * world_size:
        with pytest.raises(ValueError, match="one step needs"):
            TokenLoader(root, "train", B, T, rank=0, world_size=world_size, seed=seed)
        return
    loaders = [TokenLoader(root, "train", B, T, rank=r, world_size=world_size, seed=seed) for r in range(world_size)]
    for epoch in range(2):
        seen = epoch_windows(loaders)
        assert len(seen) == len(set(seen)), "two ranks (or steps) read the same window"
        assert set(seen) <= all_windows
        # Only the epoch's tail that cannot fill one step on every rank is dropped.
        assert len(all_windows) - len(seen) == len(all_windows) % (B * world_size)
        assert all(loader.epoch == epoch + 1 and loader.position == 0 for loader in loaders)


def test_exact_cover_when_windows_divide(tmp_path):
    root = make_shards(tmp_path, train=[4 * 8 + 1, 8 * 8 + 1, 4 * 8 + 1], val=[100])  # 4 + 8 + 4 windows of T=8
    loaders = [TokenLoader(root, "train", 2, 8, rank=r, world_size=4) for r in range(4)]
    seen = epoch_windows(loaders)
    assert sorted(seen) == [(s, w) for s, n in enumerate([4, 8, 4]) for w in range(n)]


def test_same_seed_same_batches_and_epochs_reshuffle(tmp_path):
    root = make_shards(tmp_path, train=[1000, 700, 900], val=[100])
    a, b = (TokenLoader(root, "train", 4, 16, seed=7) for _ in range(2))
    c = TokenLoader(root, "train", 4, 16, seed=8)
    first = [a.next_batch()[0] for _ in range(a.batches_per_epoch)]
    assert all(torch.equal(x, b.next_batch()[0]) for x in first)
    assert not all(torch.equal(x, c.next_batch()[0]) for x in first), "the seed should change the order"
    second = [a.next_batch()[0] for _ in range(a.batches_per_epoch)]
    assert not all(torch.equal(x, y) for x, y in zip(first, second)), "epoch 1 should be reshuffled"


def test_shard_order_is_shuffled(tmp_path):
    root = make_shards(tmp_path, train=[65] * 8, val=[100])  # 8 shards of 4 windows of T=16
    first_shards = {TokenLoader(root, "train", 1, 16, seed=s).window_ids()[0][0] for s in range(20)}
    assert len(first_shards) > 1, "every seed starts with the same shard: shard order is not shuffled"


@pytest.mark.parametrize("world_size", [1, 3])
def test_resume_gives_the_uninterrupted_batches(tmp_path, world_size):
    root = make_shards(tmp_path, train=[500, 300, 800], val=[100])
    make = lambda r: TokenLoader(root, "train", 3, 16, rank=r, world_size=world_size, seed=3)  # noqa: E731
    for rank in range(world_size):
        ref = make(rank)
        expected = [ref.next_batch() for _ in range(2 * ref.batches_per_epoch + 3)]  # crosses epochs
        run = make(rank)
        for k in (0, 5, ref.batches_per_epoch, ref.batches_per_epoch + 1):
            run.reset()
            for _ in range(k):
                run.next_batch()
            state = json.loads(json.dumps(pickle.loads(pickle.dumps(run.state_dict()))))
            resumed = make(rank)
            resumed.load_state_dict(state)
            for x_ref, y_ref in expected[k : k + 4]:
                x, y = resumed.next_batch()
                assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_resume_in_a_new_process(tmp_path):
    root = make_shards(tmp_path, train=[600, 900], val=[100])
    loader = TokenLoader(root, "train", 4, 32, seed=11)
    for _ in range(loader.batches_per_epoch + 2):
        loader.next_batch()
    state = loader.state_dict()
    expected = torch.stack([loader.next_batch()[0] for _ in range(3)])
    script = (
        "import json, sys, torch; from gpt2_scale.data import TokenLoader\n"
        f"l = TokenLoader({str(root)!r}, 'train', 4, 32, seed=11); l.load_state_dict(json.loads(sys.argv[1]))\n"
        "print(json.dumps(torch.stack([l.next_batch()[0] for _ in range(3)]).tolist()))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, json.dumps(state)], capture_output=True, text=True, env=env())
    assert out.returncode == 0, out.stderr
    assert torch.equal(torch.tensor(json.loads(out.stdout)), expected)


def test_validation_order_is_fixed(tmp_path):
    root = make_shards(tmp_path, train=[500], val=[170, 90])
    val = shard_tokens(root, "val")
    a = TokenLoader(root, "val", 2, 16, seed=1)
    b = TokenLoader(root, "val", 2, 16, seed=99)  # the seed does not touch validation
    assert a.batches_per_epoch == (10 + 5) // 2
    x0, y0 = a.next_batch()
    assert torch.equal(x0, torch.from_numpy(np.stack([val[0][0:16], val[0][16:32]]).astype(np.int64)))
    assert torch.equal(y0, torch.from_numpy(np.stack([val[0][1:17], val[0][17:33]]).astype(np.int64)))
    first = [x0] + [a.next_batch()[0] for _ in range(a.batches_per_epoch - 1)]
    assert all(torch.equal(x, b.next_batch()[0]) for x in first)
    assert all(torch.equal(x, a.next_batch()[0]) for x in first), "a second pass reads the same order"
    a.next_batch()
    a.reset()
    assert torch.equal(a.next_batch()[0], x0)


def test_ranks_split_validation_too(tmp_path):
    root = make_shards(tmp_path, train=[500], val=[16 * 8 + 1])
    r0, r1 = (TokenLoader(root, "val", 2, 16, rank=r, world_size=2) for r in range(2))
    assert r0.batches_per_epoch == r1.batches_per_epoch == 2
    assert sorted(w for _, w in epoch_windows([r0, r1])) == list(range(8))


def test_batches_are_int64_of_shape_b_t(tmp_path):
    root = make_shards(tmp_path, train=[2000], val=[300])
    x, y = TokenLoader(root, "train", 5, 32).next_batch()
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (5, 32)
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one


# --- bad inputs ----------------------------------------------------------------------------------


def test_missing_directory_or_manifest_names_the_prepare_command(tmp_path):
    for missing in (tmp_path / "nope", tmp_path):
        with pytest.raises(DataError, match=r"python tools/prepare_data\.py default --out"):
            read_manifest(missing)


def test_data_errors_are_user_errors():
    assert issubclass(DataError, UserError) and issubclass(DataError, ValueError)


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"format": 1', "is not valid JSON"),
        (b"\xff\xfe\x00garbage", "is not valid JSON"),
        (b"[]", "damaged: it is not a JSON object"),
        (b"null", "damaged: it is not a JSON object"),
        (b'{"format": 2}', "has format 2, expected 1"),
    ],
)
def test_corrupt_manifest_is_one_clear_error(tmp_path, content, message):
    root = make_shards(tmp_path, train=[500], val=[100])
    (root / MANIFEST).write_bytes(content)
    with pytest.raises(DataError, match=message) as info:
        TokenLoader(root, "train", 2, 8)
    assert str(root / MANIFEST) in str(info.value) and f"delete {root} and prepare it again" in str(info.value)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.pop("shards"), "no shards.train and shards.val lists"),
        (lambda m: m.update(shards=[]), "no shards.train and shards.val lists"),
        (lambda m: m["shards"].pop("val"), "no shards.train and shards.val lists"),
        (lambda m: m["shards"]["train"][0].pop("tokens"), r"shards.train\[0\] is not"),
        (lambda m: m["shards"]["train"][0].update(tokens="500"), r"shards.train\[0\] is not"),
        (lambda m: m["shards"]["train"][0].update(tokens=-1), r"shards.train\[0\] is not"),
        (lambda m: m["shards"]["val"][0].update(file=None), r"shards.val\[0\] is not"),
        (lambda m: m["shards"]["val"][0].update(file="../elsewhere.bin"), r"shards.val\[0\] is not"),
        (lambda m: m["shards"]["train"].__setitem__(0, "train_000000.bin"), r"shards.train\[0\] is not"),
        (lambda m: m["shards"]["val"].append(m["shards"]["train"][0]), "shard train_000000.bin is listed more than once"),
        (lambda m: m["shards"]["train"].append(m["shards"]["train"][0]), "shard train_000000.bin is listed more than once"),
        (lambda m: m.update(tokenizer="gpt2"), "no tokenizer object"),
        (lambda m: m.pop("tokens"), "no token counts"),
        (lambda m: m.pop("documents"), "no document count"),
        (lambda m: m.pop("complete"), "no complete flag"),
        (lambda m: m.update(complete="false"), "no complete flag"),
    ],
)
def test_manifest_of_the_wrong_shape_is_one_clear_error(tmp_path, change, message):
    root = make_shards(tmp_path, train=[500], val=[100])
    m = json.loads((root / MANIFEST).read_text())
    change(m)
    (root / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(DataError, match=f"{MANIFEST} is damaged: .*{message}.*; delete"):
        read_manifest(root)


def edit_manifest(root: Path, **changes) -> None:
    m = json.loads((root / MANIFEST).read_text())
    m.update(changes)
    (root / MANIFEST).write_text(json.dumps(m))


def test_unfinished_preparation_is_refused(tmp_path):
    root = make_shards(tmp_path, train=[500], val=[100])
    edit_manifest(root, complete=False, command="python tools/prepare_data.py text a.txt --out d")
    with pytest.raises(DataError, match=r"did not finish.*python tools/prepare_data\.py text a\.txt --out d"):
        TokenLoader(root, "train", 2, 8)


def test_other_tokenizer_is_refused(tmp_path):
    root = make_shards(tmp_path, train=[500], val=[100])
    edit_manifest(root, tokenizer={"name": "cl100k_base", "hash": "0123456789abcdef"})
    with pytest.raises(DataError, match="cl100k_base"):
        read_manifest(root)


@pytest.mark.parametrize("size, odd", [(798, False), (799, True), (1, True), (0, False), (801, True), (1600, False)])
def test_truncated_or_grown_shard_is_refused(tmp_path, size, odd):
    root = make_shards(tmp_path, train=[500, 400], val=[100])
    with open(root / "train_000001.bin", "r+b") as f:
        f.truncate(size)
    with pytest.raises(DataError, match=f"train_000001.bin has {size} bytes.*says 800: it is truncated") as info:
        TokenLoader(root, "train", 2, 8)
    assert ("not a whole number of 2-byte tokens" in str(info.value)) == odd


def test_missing_shard_is_refused(tmp_path):
    root = make_shards(tmp_path, train=[500, 400], val=[100])
    (root / "train_000001.bin").unlink()
    with pytest.raises(DataError, match="train_000001.bin listed in .* is missing; delete"):
        TokenLoader(root, "train", 2, 8)


def test_shard_truncated_while_in_use_is_refused(tmp_path):
    root = make_shards(tmp_path, train=[500], val=[100])
    loader = TokenLoader(root, "train", 2, 8)
    with open(root / "train_000000.bin", "r+b") as f:
        f.truncate(100)  # after the manifest check: the strided view must not read past the end
    with pytest.raises(DataError, match="train_000000.bin changed size"):
        loader.next_batch()


def test_token_id_beyond_vocabulary_is_refused(tmp_path):
    root = make_shards(tmp_path, train=[33], val=[100])
    tokens = np.fromfile(root / "train_000000.bin", dtype=np.uint16)
    tokens[5] = tokenizer.VOCAB_SIZE
    tokens.tofile(root / "train_000000.bin")
    loader = TokenLoader(root, "train", 1, 32)
    with pytest.raises(DataError, match=f"token id {tokenizer.VOCAB_SIZE} >= the vocabulary"):
        loader.next_batch()
    assert loader.position == 0


def test_split_shorter_than_a_batch_is_refused(tmp_path):
    root = make_shards(tmp_path, train=[5000], val=[16 * 4])  # 3 windows of T=16
    TokenLoader(root, "val", 3, 16)
    with pytest.raises(DataError, match=r"3 windows of T\+1=17; one step needs 4 windows"):
        TokenLoader(root, "val", 4, 16)
    with pytest.raises(ValueError, match=r"one step needs 4 windows \(2 per rank and call on 2 rank"):
        TokenLoader(root, "val", 2, 16, rank=1, world_size=2)


@pytest.mark.parametrize(
    "kwargs", [dict(split="test"), dict(batch_size=0), dict(seq_len=0), dict(rank=2, world_size=2), dict(rank=-1)]
)
def test_bad_arguments(tmp_path, kwargs):
    root = make_shards(tmp_path, train=[500], val=[100])
    with pytest.raises(ValueError):
        TokenLoader(root, **{"batch_size": 2, "seq_len": 8, **kwargs})


def test_state_from_another_configuration_is_refused(tmp_path):
    root = make_shards(tmp_path, train=[500], val=[100])
    state = TokenLoader(root, "train", 2, 8, world_size=2).state_dict()
    with pytest.raises(DataError, match="windows_per_step=4"):  # another total batch
        TokenLoader(root, "train", 2, 8).load_state_dict(state)
    with pytest.raises(DataError, match="seq_len=8"):
        TokenLoader(root, "train", 2, 16, windows_per_step=4).load_state_dict(state)
    for bad in ({**state, "position": "3"}, {**state, "epoch": None}, {**state, "position": 10**6}):
        with pytest.raises(DataError, match="out of range"):
            TokenLoader(root, "train", 4, 8).load_state_dict(bad)
    with pytest.raises(DataError, match="inside a step"):
        TokenLoader(root, "train", 4, 8).load_state_dict({**state, "position": 2})


# (B, world size) splits of one step of 12 windows: accumulation = 12 / (B * world)
SPLITS = [(12, 1), (6, 2), (3, 2), (2, 3), (1, 4), (4, 3)]


def step_windows(root: Path, B: int, world: int, steps: int, state: dict | None = None) -> tuple[list[set], dict]:
    """The window set of each of ``steps`` optimizer steps of 12 windows, read by ``world`` ranks at micro-batch B."""
    loaders = [TokenLoader(root, "train", B, 8, rank=r, world_size=world, seed=5, windows_per_step=12) for r in range(world)]
    for loader in loaders:
        if state:
            loader.load_state_dict(state)
    out = []
    for _ in range(steps):
        seen = []
        for _ in range(12 // (B * world)):
            for loader in loaders:
                seen += loader.window_ids()
                loader.next_batch()
        assert len(set(seen)) == 12  # no window twice within a step
        out.append(set(seen))
    return out, loaders[0].state_dict()


def test_a_steps_windows_do_not_depend_on_world_size_or_micro_batch(tmp_path):
    """The data half of elastic resume: step k reads the same 12 windows under every split, epochs included."""
    root = make_shards(tmp_path, train=[300, 170, 90], val=[100])  # 68 windows: 5 steps an epoch, 8 dropped
    reference, _ = step_windows(root, 12, 1, 12)
    for B, world in SPLITS[1:]:
        assert step_windows(root, B, world, 12)[0] == reference, (B, world)


@pytest.mark.parametrize("before, after", [((6, 2), (2, 3)), ((1, 4), (12, 1)), ((4, 3), (3, 2))])
def test_resume_at_another_world_size_neither_repeats_nor_skips(tmp_path, before, after):
    root = make_shards(tmp_path, train=[300, 170, 90], val=[100])
    reference, _ = step_windows(root, 12, 1, 9)
    first, state = step_windows(root, *before, 4)
    state = json.loads(json.dumps(state))  # as the trainer's JSON state holds it
    second, _ = step_windows(root, *after, 5, state)
    assert first + second == reference


def test_a_state_written_before_positions_resumes_at_the_same_window(tmp_path):
    root = make_shards(tmp_path, train=[500], val=[100])
    loader = TokenLoader(root, "train", 2, 8, world_size=2, windows_per_step=8)
    for _ in range(6):
        loader.next_batch()
    old = {"epoch": 0, "step": 6, "split": "train", "batch_size": 2, "seq_len": 8, "world_size": 2, "seed": 1337,
           "num_windows": loader.num_windows}
    resumed = TokenLoader(root, "train", 2, 8, world_size=2, windows_per_step=8)
    resumed.load_state_dict(old)
    assert resumed.window_ids() == loader.window_ids()


def _with_sha256(root: Path) -> Path:
    """The manifest as a preparation now writes it: each shard's SHA-256 beside its size."""
    manifest = json.loads((root / MANIFEST).read_text())
    for shards in manifest["shards"].values():
        for s in shards:
            s["sha256"] = sha256(root / s["file"])
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root


def test_a_state_resumes_only_on_the_data_it_was_written_on(tmp_path):
    """Another corpus of the same number of windows would resume silently at a position that means other tokens;
    the same data copied elsewhere, or from before SHA-256s were recorded, resumes."""
    root = _with_sha256(make_shards(tmp_path / "a", train=[300, 170, 90], val=[100]))
    loader = TokenLoader(root, "train", 2, 8, windows_per_step=4)
    loader.next_batch()
    loader.next_batch()  # a whole step
    state = json.loads(json.dumps(loader.state_dict()))
    shutil.copytree(root, tmp_path / "copy")
    TokenLoader(tmp_path / "copy", "train", 4, 8, windows_per_step=4).load_state_dict(state)
    other = _with_sha256(make_shards(tmp_path / "b", train=[300, 170, 90], val=[100], seed=1))  # the same sizes
    with pytest.raises(DataError, match=f"{tmp_path / 'b'} is not the data the run trained on: shard 0 has another SHA-256"):
        TokenLoader(other, "train", 2, 8, windows_per_step=4).load_state_dict(state)
    moved = make_shards(tmp_path / "c", train=[170, 300, 90], val=[100])  # the same windows in other shards
    with pytest.raises(DataError, match="its 3 shard\\(s\\) held 560 tokens, these 3 hold 560 in other shards"):
        TokenLoader(moved, "train", 2, 8, windows_per_step=4).load_state_dict(state)
    TokenLoader(make_shards(tmp_path / "old", train=[300, 170, 90], val=[100], seed=1), "train", 2, 8,
                windows_per_step=4).load_state_dict(state)  # no SHA-256s to tell it apart: only the sizes
    TokenLoader(other, "train", 2, 8, windows_per_step=4).load_state_dict({k: v for k, v in state.items() if k != "shards"})
