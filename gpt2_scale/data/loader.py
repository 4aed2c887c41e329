"""Token shards to (x, y) batches: deterministic, resumable and rank-aware.

A shard of n tokens holds (n - 1) // T windows of T + 1 tokens at stride T, so a sequence never
crosses a shard boundary (each shard's last < T tokens are never a target). An epoch is every
window of the split once. For the train split each epoch draws, from (seed, epoch), a shard order
and then a window order inside each shard; the validation split is read in file order, always the
same. An optimizer step takes the next G windows of the epoch (G = ``windows_per_step``, the total
batch in windows); each call of ``next_batch`` takes the next B * world_size of them and rank r reads
the r-th block of B, so ranks never overlap and together cover the epoch. A step's G windows are thus
the same set whatever the world size and the micro-batch/accumulation split; the last < G windows of
an epoch are dropped so every step is whole.

The state is (epoch, position): windows of the epoch consumed by all ranks together. It is the same on
every rank, so rank 0's copy resumes them all, and it means the same at any world size and micro-batch
that divide G: a run resumed on another number of ranks neither repeats nor skips a window.
Memory is O(windows of one shard) for the permutations plus page cache for the memmaps, whatever
the corpus size.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from gpt2_scale import tokenizer
from gpt2_scale.errors import UserError
from gpt2_scale.fileio import sha256

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
DTYPE = "uint16"
SPLITS = ("train", "val")
PREPARE_HINT = (
    "prepare it first, e.g. `python tools/prepare_data.py default --out {dir}` (embedded corpus, no download), "
    "`python tools/prepare_data.py text FILE.txt --out {dir}` or "
    "`python tools/prepare_data.py fineweb-edu --out {dir}`"
)


class DataError(UserError, ValueError):
    """Token shards, or the input of their preparation, that cannot be used; the message says what to do."""


def is_count(value: object) -> bool:
    """A count in a JSON file: an int >= 0 (JSON's true is a bool, not a count)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_file_name(value: object) -> bool:
    """A plain file name: a manifest names its shards inside its own directory, never elsewhere."""
    return isinstance(value, str) and value not in ("", ".", "..") and Path(value).name == value


def _shape_problem(manifest: object) -> str | None:
    """What is missing from a manifest that parsed (a hand edit, another program's file), or None."""
    if not isinstance(manifest, dict):
        return "it is not a JSON object"
    if not isinstance(manifest.get("tokenizer"), dict):
        return "it has no tokenizer object"
    shards = manifest.get("shards")
    if not isinstance(shards, dict) or not all(isinstance(shards.get(split), list) for split in SPLITS):
        return "it has no shards.train and shards.val lists"
    for split in SPLITS:
        for i, shard in enumerate(shards[split]):
            if not (isinstance(shard, dict) and _is_file_name(shard.get("file")) and is_count(shard.get("tokens"))):
                return f'shards.{split}[{i}] is not a {{"file": NAME, "tokens": COUNT}} entry'
    listed = [shard["file"] for split in SPLITS for shard in shards[split]]
    twice = sorted(file for file, n in Counter(listed).items() if n > 1)
    if twice:  # in both splits, validation would score text the model trained on; in one, read it twice per epoch
        return f"shard {twice[0]} is listed more than once (each shard belongs to one split, once)"
    if not isinstance(manifest.get("complete"), bool):
        return "it has no complete flag (true or false)"
    if manifest["complete"]:
        totals = manifest.get("tokens")
        if not (isinstance(totals, dict) and all(is_count(totals.get(s)) for s in SPLITS)):
            return "it has no token counts (tokens.train and tokens.val)"
        if not is_count(manifest.get("documents")):
            return "it has no document count"
    return None


def parse_manifest(data_dir: str | Path) -> dict:
    """The manifest of a preparation, finished or not, checked for everything its readers index into;
    shared by the loader and by a resumed preparation, so a damaged file is one clear error in both."""
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST
    redo = f"delete {data_dir} and prepare it again"
    if not path.is_file():
        raise DataError(f"no token shards: {_not_shards(data_dir)}")
    try:
        manifest = json.loads(path.read_bytes())
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:  # JSONDecodeError, or bytes that are not text at all
        raise DataError(f"{path} is not valid JSON ({e}); {redo}") from None
    if isinstance(manifest, dict) and manifest.get("format") != FORMAT_VERSION:
        raise DataError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT_VERSION}; {redo}")
    problem = _shape_problem(manifest)
    if problem:
        raise DataError(f"{path} is damaged: {problem}; {redo}")
    return manifest


def _not_shards(data_dir: Path) -> str:
    """What ``data_dir``, which holds no manifest, is instead, and the way to token shards."""
    if data_dir.is_file():
        return f"{data_dir} is a file; pass the directory a preparation wrote (its --out)"
    if (data_dir / "config.yaml").is_file():
        return f"{data_dir} is a training run's directory; pass the directory of its data (data.dir in its config.yaml)"
    if not data_dir.is_dir():
        return f"directory {data_dir} not found; {PREPARE_HINT.format(dir=data_dir)}"
    if any(data_dir.iterdir()):  # a preparation refuses it: another directory
        return f"{data_dir} holds no {MANIFEST}, so nothing was prepared there; {PREPARE_HINT.format(dir='NEW_DIR')}"
    return f"{MANIFEST} in directory {data_dir} not found; {PREPARE_HINT.format(dir=data_dir)}"


def check_shards(data_dir: str | Path, manifest: dict) -> None:
    """Every shard the manifest lists exists at the size it states (a stat each, nothing read)."""
    data_dir = Path(data_dir)
    itemsize = np.dtype(DTYPE).itemsize
    for split in SPLITS:
        for shard in manifest["shards"][split]:
            file = data_dir / shard["file"]
            if not file.is_file():
                raise DataError(
                    f"shard {file} listed in {data_dir / MANIFEST} is missing; delete {data_dir} and prepare it again"
                )
            size, expected = file.stat().st_size, shard["tokens"] * itemsize
            if size != expected:
                odd = f", not a whole number of {itemsize}-byte tokens" if size % itemsize else ""
                raise DataError(
                    f"shard {file} has {size} bytes{odd}, but {data_dir / MANIFEST} says {expected}: it is truncated "
                    f"or was overwritten; delete {data_dir} and prepare it again"
                )


def verify_shards(data_dir: str | Path, workers: int = 4, progress: bool = True) -> tuple[int, int]:
    """Read every shard and compare its SHA-256 with the one the manifest recorded when it was written:
    (shards that matched, shards with no recorded SHA-256). Raises DataError naming the shards that differ.

    check_shards, which every run does, sees a shard missing or cut short; this sees one changed in place (a
    copy gone wrong, a failing disk, a write by another program), at the cost of reading all of them."""
    data_dir = Path(data_dir)
    manifest = parse_manifest(data_dir)
    check_shards(data_dir, manifest)
    shards = [shard for split in SPLITS for shard in manifest["shards"][split]]
    recorded = [shard for shard in shards if "sha256" in shard]  # absent in preparations made before it was kept
    if odd := [s["file"] for s in recorded if not (isinstance(s["sha256"], str) and re.fullmatch(r"[0-9a-fA-F]{64}", s["sha256"]))]:
        raise DataError(f"{data_dir / MANIFEST} gives {odd[0]} a sha256 that is not 64 hex digits: it was edited; put back the "
                        "manifest that prepare_data wrote, or prepare the data again")
    with ThreadPoolExecutor(workers) as pool:  # hashlib releases the GIL: threads hash in parallel
        digests = list(tqdm(pool.map(lambda shard: sha256(data_dir / shard["file"]), recorded), total=len(recorded),
                            desc=f"verifying {data_dir}", unit="shard", disable=not progress))
    bad = [shard["file"] for shard, digest in zip(recorded, digests) if digest != shard["sha256"].lower()]
    if bad:
        named = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DataError(f"{len(bad)} of the {len(recorded)} shards of {data_dir} differ from the SHA-256 recorded when they were "
                        f"written ({named}): they were changed or damaged since; delete {data_dir} and prepare it again")
    return len(recorded), len(shards) - len(recorded)


def read_manifest(data_dir: str | Path) -> dict:
    """The manifest of a finished preparation, with its shards checked to exist at the stated size."""
    data_dir = Path(data_dir)
    manifest = parse_manifest(data_dir)
    if not manifest["complete"]:
        raise DataError(
            f"the preparation of {data_dir} did not finish; run `{manifest.get('command') or 'the same command'}` "
            "again to resume it"
        )
    tok = manifest["tokenizer"]
    if tok.get("hash") != tokenizer.HASH:
        raise DataError(
            f"{data_dir} was tokenized with {tok.get('name')!r} (hash {tok.get('hash')}), not this package's "
            f"{tokenizer.NAME!r} (hash {tokenizer.HASH}); prepare it again with tools/prepare_data.py"
        )
    if manifest.get("dtype") != DTYPE:
        raise DataError(
            f"{data_dir / MANIFEST} says dtype {manifest.get('dtype')!r}; only {DTYPE} shards are supported"
        )
    check_shards(data_dir, manifest)
    return manifest


def windows_per_shard(tokens: int, seq_len: int) -> int:
    """Windows of seq_len + 1 tokens at stride seq_len that fit in a shard."""
    return max(0, (tokens - 1) // seq_len)


@functools.lru_cache(maxsize=8)
def _epoch_layout(seed: int, epoch: int, counts: tuple[int, ...], shuffle: bool) -> tuple[np.ndarray, np.ndarray]:
    """(shard order, cumulative windows in that order) of an epoch."""
    order = np.arange(len(counts))
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(order)
    return order, np.cumsum(np.asarray(counts, dtype=np.int64)[order])


@functools.lru_cache(maxsize=8)
def _window_order(seed: int, epoch: int, shard: int, n: int) -> np.ndarray:
    # One shard's permutation: 100M tokens / T=1024 is ~100K windows, under 1 MB of int64.
    return np.random.default_rng([seed, epoch, shard]).permutation(n)


def _other_data(saved: object, mine: list[list]) -> str | None:
    """How the shards a loader state was written on (``saved``: TokenLoader._shards) differ from ``mine``, or None.
    The same token counts with the same SHA-256s, where both record them, are the same data wherever it lies (a
    corpus copied or moved, or prepared again)."""
    if saved is None or saved == mine:
        return None
    if not isinstance(saved, list) or not all(isinstance(s, list) and len(s) == 2 for s in saved):
        return f"the checkpoint records its shards as {str(saved)[:80]!r}"
    counts = [s[0] for s in saved]
    if counts != [s[0] for s in mine]:
        return (f"its {len(saved)} shard(s) held {sum(c for c in counts if is_count(c)):,} tokens, these {len(mine)} hold "
                f"{sum(s[0] for s in mine):,}" + (" in other shards" if len(saved) == len(mine) else ""))
    differ = [i for i, (a, b) in enumerate(zip(saved, mine)) if a[1] and b[1] and a[1] != b[1]]
    return f"shard {differ[0]} has another SHA-256 than the run's" if differ else None


class TokenLoader:
    """(x, y) int64 batches of shape (B, T) from the shards of one split; y is x shifted by one."""

    def __init__(
        self,
        data_dir: str | Path,
        split: str = "train",
        batch_size: int = 8,
        seq_len: int = 1024,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 1337,
        windows_per_step: int | None = None,
    ) -> None:
        """``windows_per_step``: windows one optimizer step reads across all ranks (total batch tokens / T);
        default B * world_size (one call per step, as the validation loader)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank} and world_size {world_size}")
        per_call = batch_size * world_size
        windows_per_step = windows_per_step or per_call
        if windows_per_step % per_call:
            raise ValueError(f"windows_per_step {windows_per_step} is not a multiple of batch_size x world_size = {per_call}")
        self.data_dir = Path(data_dir)
        self.manifest = read_manifest(self.data_dir)
        self.split, self.B, self.T = split, batch_size, seq_len
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle = split == "train"  # validation is read in a fixed order, comparable across evals
        shards = self.manifest["shards"][split]
        self.files = [self.data_dir / s["file"] for s in shards]
        self.counts = tuple(windows_per_shard(s["tokens"], seq_len) for s in shards)
        self._counts = np.array(self.counts, dtype=np.int64)
        self.num_windows = sum(self.counts)
        self.windows_per_step = windows_per_step
        self.epoch_windows = self.num_windows // windows_per_step * windows_per_step  # whole steps only
        self.batches_per_epoch = self.epoch_windows // per_call  # calls of next_batch
        if self.batches_per_epoch == 0:
            tokens = sum(s["tokens"] for s in shards)
            raise DataError(
                f"the {split} split of {self.data_dir} has {tokens} tokens in {len(shards)} shard(s), "
                f"{self.num_windows} windows of T+1={seq_len + 1}; one step needs {windows_per_step} windows "
                f"({batch_size} per rank and call on {world_size} rank(s)): lower the batch or --seq-len, or prepare "
                "more data (--val-tokens for the validation split)"
            )
        self._memmaps: dict[int, np.ndarray] = {}
        self._window_views: dict[int, np.ndarray] = {}
        self.epoch, self.position = 0, 0

    def _shard(self, i: int) -> np.ndarray:
        if i not in self._memmaps:  # a plain ndarray view of the memmap: slicing np.memmap itself is slow
            tokens = np.memmap(self.files[i], dtype=DTYPE, mode="r").view(np.ndarray)
            if len(tokens) != self.manifest["shards"][self.split][i]["tokens"]:  # the strided view must not overrun
                raise DataError(f"shard {self.files[i]} changed size while in use; prepare {self.data_dir} again")
            self._memmaps[i] = tokens
        return self._memmaps[i]

    def _windows(self, i: int) -> np.ndarray:
        """Shard i as a read-only (windows, T+1) view at stride T: a batch is then one C-level row gather."""
        if i not in self._window_views:
            tokens = self._shard(i)
            shape, strides = (self.counts[i], self.T + 1), (self.T * tokens.itemsize, tokens.itemsize)
            self._window_views[i] = np.lib.stride_tricks.as_strided(tokens, shape, strides, writeable=False)
        return self._window_views[i]

    def _locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The windows at ``positions`` (ascending) of the epoch's order as (shard, window within shard) arrays."""
        order, cum = _epoch_layout(self.seed, self.epoch, self.counts, self.shuffle)
        slots = np.searchsorted(cum, positions, side="right")
        shards = order[slots]
        windows = positions - (cum[slots] - self._counts[shards])
        if self.shuffle:
            for shard in [shards[0]] if shards[0] == shards[-1] else np.unique(shards).tolist():  # shards are blocks
                mine = shards == shard
                windows[mine] = _window_order(self.seed, self.epoch, shard, self.counts[shard])[windows[mine]]
        return shards, windows

    def _mine(self) -> np.ndarray:
        """The positions of this rank's rows in the next batch."""
        start = self.position + self.rank * self.B
        return np.arange(start, start + self.B)

    def window_ids(self) -> list[tuple[int, int]]:
        """(shard, window) of each row of the next batch, without consuming it (for tests and debugging)."""
        return list(zip(*(a.tolist() for a in self._locate(self._mine()))))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batch_at(self._mine())
        self.position += self.B * self.world_size
        if self.position == self.epoch_windows:  # the train split reshuffles; val starts over in the same order
            self.epoch, self.position = self.epoch + 1, 0
        return x, y

    def batch_at(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of the windows at ``positions`` (ascending) of this epoch's order, one row each; the position
        stays (validation reads a fixed set of windows this way, however they are split among ranks)."""
        T = self.T
        shards, windows = self._locate(positions)
        if shards[0] == shards[-1]:  # a batch's shards come in blocks: usually a single one
            rows = self._windows(int(shards[0]))[windows]
        else:
            rows = np.empty((len(positions), T + 1), dtype=DTYPE)
            for shard in np.unique(shards).tolist():
                mine = shards == shard
                rows[mine] = self._windows(shard)[windows[mine]]
        if int(rows.max()) >= tokenizer.VOCAB_SIZE:
            shard = int(shards[rows.max(axis=1).argmax()])
            raise DataError(
                f"shard {self.files[shard]} holds token id {int(rows.max())} >= the vocabulary size "
                f"{tokenizer.VOCAB_SIZE}: it is corrupt or from another tokenizer; prepare {self.data_dir} again"
            )
        # One cast; x and y are overlapping views of it (copying them apart would double the bytes written).
        xy = torch.from_numpy(rows.astype(np.int64))
        return xy[:, :-1], xy[:, 1:]

    def check_ahead(self, calls: int) -> None:
        """Read the next ``calls`` batches and go back: bad data in them raises now (before a run writes anything)."""
        state = self.state_dict()
        try:
            for _ in range(calls):
                self.next_batch()
        finally:
            self.load_state_dict(state)

    def reset(self) -> None:
        """Back to the first batch of epoch 0, as a fresh loader starts (validation reads its windows by position: batch_at)."""
        self.epoch, self.position = 0, 0

    def state_dict(self) -> dict:
        """What resumes the order at any world size and micro-batch: the position, and what fixes its meaning."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "split": self.split,
            "seq_len": self.T,
            "windows_per_step": self.windows_per_step,
            "seed": self.seed,
            "num_windows": self.num_windows,
            "shards": self._shards(),
        }

    def _shards(self) -> list[list]:
        """[tokens, SHA-256 or None] of each shard of the split: which data a position counts in."""
        shards = self.manifest["shards"][self.split]
        return [[s["tokens"], s["sha256"].lower() if isinstance(s.get("sha256"), str) else None] for s in shards]

    def load_state_dict(self, state: dict) -> None:
        if "position" not in state and is_count(state.get("step")):  # written before positions (B x world per call)
            state = {**state, "position": state["step"] * state.get("batch_size", 0) * state.get("world_size", 0),
                     "windows_per_step": self.windows_per_step}
        mine = self.state_dict()
        for key in ("split", "seq_len", "windows_per_step", "seed", "num_windows"):
            if state.get(key) != mine[key]:
                raise DataError(
                    f"loader state has {key}={state.get(key)!r} but this loader has {mine[key]!r}; resume with the "
                    "same data, total batch, sequence length and seed"
                )
        if (other := _other_data(state.get("shards"), mine["shards"])) is not None:  # absent in states from before it was kept
            raise DataError(f"{self.data_dir} is not the data the run trained on: {other}")
        epoch, position = state.get("epoch"), state.get("position")
        if not (is_count(epoch) and is_count(position) and position < self.epoch_windows):
            raise DataError(f"loader state epoch={epoch!r} position={position!r} is out of range")
        if position % (self.B * self.world_size):
            raise DataError(
                f"loader state position {position} is inside a step of {self.B * self.world_size} windows per call; "
                "resume from a checkpoint taken between optimizer steps"
            )
        self.epoch, self.position = epoch, position
