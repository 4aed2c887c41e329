"""HellaSwag, completion style: of 4 endings, which one does the model find most likely after the context?

Scored the way the seed's hellaswag.py (karpathy/build-nanogpt) scores it, so results compare with
its published numbers: each candidate is the tokens of the context followed by the tokens of
" " + ending (encoded apart), and the cross-entropy is taken over the ending tokens only. ``acc``
picks the ending with the lowest summed loss; ``acc_norm`` the lowest mean loss per ending token,
which does not reward short endings. A candidate longer than the model's context is cut on the
left: the oldest context tokens go, the ending stays whole (unless it alone is longer than the
context).

Under FSDP and ZeRO-3 every forward pass holds collectives, so every rank runs the same number of
forward passes; a rank that runs out of examples runs dummy batches whose results it drops.
"""

from __future__ import annotations

import json
import math
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from gpt2_scale import fileio
from gpt2_scale.device import resolve
from gpt2_scale.errors import UserError
from gpt2_scale.tokenizer import encode

VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
NUM_VAL_EXAMPLES = 10042
NUM_ENDINGS = 4


class HellaSwagError(UserError, ValueError):
    """A HellaSwag file that cannot be read or fetched; the message names it (file:line) and says what to do."""


@dataclass(frozen=True)
class Example:
    ctx: str
    endings: tuple[str, ...]
    label: int  # index of the true ending


def cache_dir() -> Path:
    """Where the downloaded file lives: $GPT2_SCALE_CACHE/hellaswag, default ~/.cache/gpt2_scale/hellaswag."""
    return fileio.cache_dir() / "hellaswag"


def download(directory: str | os.PathLike | None = None, url: str = VAL_URL, refresh: bool = False) -> Path:
    """The validation file, downloaded with a progress bar on first use and read from the cache after (``refresh``:
    fetched again, replacing the cached one once the new one has checked out); ``url`` may also be a file's path (a
    copy brought from a machine with network)."""
    path = Path(directory or cache_dir()) / "hellaswag_val.jsonl"
    if path.is_file() and not refresh:
        return path
    url = _as_url(url)  # before anything is created: urllib refuses an unknown scheme only once torch made its file
    fileio.make_dirs(path.parent, "--out" if directory else None)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        torch.hub.download_url_to_file(url, str(partial), progress=True)
        load_examples(partial)  # only a file of HellaSwag examples enters the cache, where every later run reads it
        os.replace(partial, path)
    except OSError as e:  # urllib's URLError and HTTPError are OSErrors
        raise HellaSwagError(
            f"could not download HellaSwag from {url} ({e}). Without network, copy hellaswag_val.jsonl from a machine "
            "that has it, and cache it with `python tools/prepare_data.py hellaswag --url PATH` or pass PATH to what "
            "reads it (eval_hellaswag.py --data PATH, a recipe's --log.hellaswag_data=PATH, load_examples(PATH))"
        ) from None
    except HellaSwagError as e:
        raise HellaSwagError(f"{url} is not HellaSwag's validation file ({e}); nothing was cached: check the URL") from None
    finally:
        partial.unlink(missing_ok=True)
    return path


def _as_url(source: str) -> str:
    """``source`` as a URL urllib opens: a URL as it is, a file's path as a file:// URL."""
    scheme = urllib.parse.urlsplit(source).scheme
    if scheme in ("http", "https", "ftp", "file"):
        return source
    if scheme:
        raise HellaSwagError(f"{source} is not an http(s):// or file:// URL, nor a file's path; pass one of those")
    return Path(source).expanduser().resolve().as_uri()


def parse_example(line: str | bytes, where: str = "HellaSwag line") -> Example:
    """One JSON line of the official files (UTF-8); ``where`` names it in errors (file:line)."""
    expected = "expected a line of hellaswag_val.jsonl"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise HellaSwagError(f"{where}: not JSON ({e.msg}); {expected}") from None
    except UnicodeDecodeError:
        raise HellaSwagError(f"{where}: not UTF-8 text; {expected}") from None
    if not isinstance(obj, dict):
        raise HellaSwagError(f"{where}: a HellaSwag line is a JSON object with ctx, endings and label; {expected}")
    missing = [k for k in ("ctx", "endings", "label") if k not in obj]
    if missing:
        raise HellaSwagError(
            f"{where}: a HellaSwag line is a JSON object with ctx, endings and label; "
            f"this one lacks {', '.join(missing)}"
        )
    ctx, endings, label = obj["ctx"], obj["endings"], obj["label"]
    if not isinstance(ctx, str) or not ctx.strip():
        raise HellaSwagError(f"{where}: ctx must be a non-empty string")
    if not isinstance(endings, list) or len(endings) != NUM_ENDINGS or not all(isinstance(e, str) for e in endings):
        raise HellaSwagError(f"{where}: endings must be a list of {NUM_ENDINGS} strings")
    try:  # the official files store it as an int, some copies as a string; int() would take 1.7 and true too
        label = int(label) if type(label) is int or isinstance(label, str) else -1
    except ValueError:
        label = -1
    if not 0 <= label < NUM_ENDINGS:
        raise HellaSwagError(
            f"{where}: label must be 0-3, got {obj['label']!r} (the test split has no labels: use val)"
        )
    return Example(ctx, tuple(endings), label)


def load_examples(path: str | os.PathLike | None, limit: int | None = None) -> list[Example]:
    """The examples of ``path`` (a .jsonl in the official schema), or of the downloaded val file when None."""
    if limit is not None and limit < 1:
        raise HellaSwagError(f"limit must be >= 1, got {limit}")
    if path is None:
        cached = download()
        try:
            return load_examples(cached, limit)
        except HellaSwagError as e:
            raise HellaSwagError(f"{e}. That is the cached copy: `python tools/prepare_data.py hellaswag` fetches it again") from None
    path = Path(path)
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "does not exist"
        raise HellaSwagError(f"HellaSwag file {path} {problem}; pass the path of hellaswag_val.jsonl")
    examples = []
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is then reported with its number
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(examples) == limit:
                break
            if line := line.strip():
                examples.append(parse_example(line, f"{path}:{lineno}"))
    if not examples:
        raise HellaSwagError(f"{path} holds no HellaSwag examples; pass the path of hellaswag_val.jsonl")
    return examples


def render(example: Example, block_size: int) -> list[tuple[list[int], int]]:
    """Per ending: the candidate's tokens, left-truncated to block_size, and how many final ones are scored."""
    ctx = encode(example.ctx)
    candidates = []
    for ending in example.endings:
        end = encode(" " + ending)  # GPT-2's BPE attaches the space to the word that follows it
        tokens = (ctx + end)[-block_size:]
        candidates.append((tokens, min(len(end), len(tokens) - 1)))  # the first token has nothing to predict it
    return candidates


def collate(rendered: list[list[tuple[list[int], int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (tokens, targets), one row per candidate: targets[t] = tokens[t+1] where that is an
    ending token, -1 (ignored) everywhere else, so padding never counts."""
    rows = [candidate for example in rendered for candidate in example]
    width = max(len(tokens) for tokens, _ in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, (row, n_scored) in enumerate(rows):
        end = len(row)
        tokens[i, :end] = torch.tensor(row)
        targets[i, end - 1 - n_scored : end - 1] = tokens[i, end - n_scored : end]
    return tokens, targets


def candidate_losses(
    model: torch.nn.Module, tokens: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed and mean cross-entropy of each row's scored tokens, each of shape (rows,)."""
    logits, _ = model(tokens)
    # (rows·T, vocab), not (rows, vocab, T): on CPU the strided layout sums the softmax ~100x less precisely
    losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1, reduction="none")
    total = losses.view(targets.shape).sum(dim=1)
    return total, total / (targets != -1).sum(dim=1)


def _block_size(model: torch.nn.Module) -> int:
    """The context length, looking through DDP/DeepSpeed (.module) and torch.compile (._orig_mod) wrappers."""
    inner = model
    while not hasattr(inner, "config"):
        inner = getattr(inner, "module", getattr(inner, "_orig_mod", None))
        if inner is None:
            raise ValueError(f"cannot find the context length of a {type(model).__name__}: pass a GPT or its wrapper")
    if inner.config.block_size < 2:
        raise ValueError("HellaSwag needs a context length of at least 2 tokens")
    return inner.config.block_size


@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # every batch has its own width: compiled blocks would recompile
def evaluate(
    model: torch.nn.Module,
    examples: list[Example],
    device: str | torch.device,
    rank: int = 0,
    world_size: int = 1,
    batch_examples: int = 4,
    progress: bool = False,
) -> dict:
    """{"acc", "acc_norm", "n"} over all examples; call it on every rank with the same examples."""
    if not examples:
        raise ValueError("no HellaSwag examples to evaluate")
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank} and world_size {world_size}")
    if batch_examples < 1:
        raise HellaSwagError(f"batch_examples must be >= 1, got {batch_examples}")
    device = torch.device(device)
    runtime = resolve("evaluate", device)  # bf16 autocast on CUDA
    block_size = _block_size(model)
    mine = examples[rank::world_size]
    n_batches = math.ceil(math.ceil(len(examples) / world_size) / batch_examples)  # the same on every rank
    counts = torch.zeros(3, dtype=torch.long, device=device)  # correct by sum, correct by mean, examples
    was_training = model.training
    model.eval()
    try:
        for b in tqdm(range(n_batches), desc="hellaswag", disable=not progress or rank != 0):
            batch = mine[b * batch_examples : (b + 1) * batch_examples]
            if batch:
                tokens, targets = collate([render(ex, block_size) for ex in batch])
            else:  # dummy work keeps this rank's collectives in step with the others
                tokens = targets = torch.zeros(NUM_ENDINGS, 2, dtype=torch.long)
            with runtime.autocast():
                total, mean = candidate_losses(model, tokens.to(device), targets.to(device))
            if batch:
                labels = torch.tensor([ex.label for ex in batch], device=device)
                counts[0] += (total.view(-1, NUM_ENDINGS).argmin(dim=1) == labels).sum()
                counts[1] += (mean.view(-1, NUM_ENDINGS).argmin(dim=1) == labels).sum()
                counts[2] += len(batch)
    finally:
        model.train(was_training)
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    correct, correct_norm, n = counts.tolist()
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": n}
