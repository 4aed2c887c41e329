"""Tokenize a corpus into GPT-2 token shards that TokenLoader reads.

    python tools/prepare_data.py default --out data/default          # embedded corpus, no download
    python tools/prepare_data.py text corpus.txt more/ --out data/mine   # .txt / .jsonl / .parquet
    python tools/prepare_data.py fineweb-edu --out data/fineweb-edu-10BT      # streams the hub
    python tools/prepare_data.py fineweb-edu --from-dir parquet/ --out data/fineweb-edu
    python tools/prepare_data.py hellaswag                            # the eval set, into the recipes' cache
    python tools/prepare_data.py verify data/fineweb-edu-10BT         # every shard against its recorded SHA-256

Re-running the same command resumes after the last complete shard. `fineweb-edu` also fetches HellaSwag (the
124M recipes evaluate it), so a node without network finds everything it needs.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from gpt2_scale.data import prepare as data  # the module
from gpt2_scale.data.loader import parse_manifest, verify_shards
from gpt2_scale.errors import UserError, quiet_when_the_reader_left, report
from gpt2_scale.eval import hellaswag
from gpt2_scale.fileio import cache_dir
from gpt2_scale.tools.args import positive


@quiet_when_the_reader_left
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="source", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--shard-tokens", type=int, default=data.DEFAULT_SHARD_TOKENS, help="tokens per shard")
    common.add_argument(
        "--val-tokens", type=int, default=None,
        help="tokens of the validation split (default: the first shard, or 10%% when the corpus fits in one)",
    )  # fmt: skip
    common.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    common.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("default", parents=[common], help="CPython's documentation text, shipped with Python")
    p.add_argument("--out", help=f"output directory (default: the cache, {cache_dir() / 'default'})")
    p = sub.add_parser("text", parents=[common], help="local .txt / .jsonl / .parquet files or directories")
    p.add_argument("paths", nargs="+")
    p.add_argument("--field", default="text", help="the text field of .jsonl / .parquet records")
    p.add_argument("--out", required=True)
    p = sub.add_parser("fineweb-edu", parents=[common], help=f"{data.FINEWEB_EDU} from the hub or a local copy")
    p.add_argument("--config", default="sample-10BT", help="hub config: sample-10BT, sample-100BT, default, ...")
    p.add_argument("--from-dir", help="a directory of the data set's parquet/jsonl files (no network)")
    p.add_argument("--out", required=True)
    p.add_argument("--no-hellaswag", action="store_true", help="do not also fetch HellaSwag into the cache")
    p = sub.add_parser("hellaswag", help="HellaSwag's validation set into the cache the recipes read")
    p.add_argument("--out", help=f"directory (default: {hellaswag.cache_dir()}, from $GPT2_SCALE_CACHE)")
    p.add_argument("--url", help="where to fetch it from, replacing a cached copy: a mirror, a file:// URL or a file's path "
                   f"(default: {hellaswag.VAL_URL}, when nothing is cached or the cached copy is damaged)")
    p = sub.add_parser("verify", help="read every shard of a prepared directory and check it against the SHA-256 recorded for it")
    p.add_argument("dir")
    p.add_argument("--workers", type=positive, default=4, help="shards hashed at once")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    command = "python tools/prepare_data.py " + shlex.join(argv)
    try:
        if args.source == "verify":
            print(verify(args.dir, args.workers, not args.quiet))
            return 0
        if args.source == "hellaswag":
            print(fetch_hellaswag(args.out, args.url))
            return 0
        if args.source == "default" and args.out is None:
            out = data.ensure_default_corpus()
            print(f"default corpus ready in {out}")
            return 0
        if args.source == "default":
            source = data.default_source()
        elif args.source == "text":
            source = data.text_source(args.paths, args.field)
        else:
            source = data.fineweb_edu_source(args.config, args.from_dir)
        m = data.prepare_shards(
            source, args.out, args.shard_tokens, args.val_tokens, args.workers, command, progress=not args.quiet
        )
    except (UserError, OSError) as e:  # OSError: an unreachable hub (ConnectionError), a full disk
        return report(e)
    except KeyboardInterrupt:  # every write is atomic and the manifest records how far it got
        print(f"interrupted; what it wrote is kept: run `{command}` again to go on from there", file=sys.stderr)
        return 130
    t = m["tokens"]
    print(
        f"{args.out}: {t['train']:,} train and {t['val']:,} val tokens from {m['documents']:,} documents in "
        f"{len(m['shards']['train'])} + {len(m['shards']['val'])} shards"
    )
    if args.source == "fineweb-edu" and not args.no_hellaswag:
        try:
            print(fetch_hellaswag(None, None))
        except UserError as e:  # the shards are ready; HellaSwag can follow where there is network
            print(f"warning: HellaSwag was not fetched: {e} (or: python tools/prepare_data.py hellaswag)", file=sys.stderr)
    return 0


def verify(data_dir: str, workers: int, progress: bool) -> str:
    """What verify_shards found, in a line; a shard that differs is a DataError."""
    matched, unrecorded = verify_shards(data_dir, workers, progress)
    if not matched:
        line = (f"{data_dir}: its {unrecorded} shard(s) were prepared before SHA-256s were recorded, so only their sizes "
                "could be checked (they match the manifest); delete it and prepare it again to have them")
    else:
        line = f"{data_dir}: all {matched} shard(s) match the SHA-256 recorded when they were written"
        if unrecorded:
            line += f"; {unrecorded} more, prepared before SHA-256s were recorded, have the sizes the manifest gives"
    if not parse_manifest(data_dir)["complete"]:
        line += " (the preparation has not finished: run its command again to resume it)"
    return line


def fetch_hellaswag(out: str | None, url: str | None) -> str:
    """Download HellaSwag's validation file (from ``url``, replacing a cached copy; by default, unless one is cached
    and whole) and check that every line parses."""
    path = hellaswag.download(out, url=url or hellaswag.VAL_URL, refresh=url is not None)
    try:
        n = len(hellaswag.load_examples(path))
    except hellaswag.HellaSwagError as e:  # a damaged cached copy: fetched again, and replaced once that one checks out
        print(f"warning: {e}; fetching it again", file=sys.stderr)
        n = len(hellaswag.load_examples(hellaswag.download(out, url=hellaswag.VAL_URL, refresh=True)))
    if n != hellaswag.NUM_VAL_EXAMPLES:  # a part of it, or another split: every evaluation would score only these
        print(f"warning: {path} holds {n:,} examples, HellaSwag's validation split {hellaswag.NUM_VAL_EXAMPLES:,}: accuracies "
              "on it do not compare with the published ones; delete it and fetch the whole file", file=sys.stderr)
    return f"HellaSwag: {n:,} validation examples in {path}"


if __name__ == "__main__":
    sys.exit(main())
