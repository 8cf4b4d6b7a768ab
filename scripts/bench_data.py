"""Data pipeline throughput: `prepare` against a plain tiktoken loop, and the TokenLoader.

    python scripts/bench_data.py [--file ../shared/data/gutenberg_train.jsonl.xz] [--workers N]

1. baseline: one process reads the jsonl.xz, parses each line and calls `encode_ordinary`;
2. `prepare` on the same file with 1 and with N tokeniser processes (shards, hashes and manifest included);
3. `verify_data_dir`, hashing every shard (which also brings them into memory);
4. `TokenLoader.next_batch` on the prepared train split, 64 x 1024 windows, in file order and shuffled
   (unpinned: pinning needs a GPU, and costs the same whichever order made the window); the first
   batch, which opens the shard and, shuffled, scans it for document starts, is timed apart.
Prints a Markdown table; every rate counts the same tokens (text tokens plus one EOT per document).
"""

from __future__ import annotations

import argparse
import json
import lzma
import tempfile
import time
from pathlib import Path

from gpt2repro.data import TokenLoader, default_workers, prepare, read_manifest, verify_data_dir
from gpt2repro.tokenizer import get_encoding

DEFAULT_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "gutenberg_train.jsonl.xz"


def plain_tiktoken_loop(path: Path) -> int:
    encode = get_encoding().encode_ordinary
    tokens = 0
    with lzma.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            tokens += len(encode(json.loads(line)["text"])) + 1
    return tokens


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE)
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--batches", type=int, default=200, help="loader batches timed per order")
    args = parser.parse_args()
    get_encoding()  # build the tokenizer outside every timing

    rows = []
    tokens, seconds = timed(lambda: plain_tiktoken_loop(args.file))
    rows.append(("plain tiktoken loop, 1 process", tokens, seconds))
    with tempfile.TemporaryDirectory() as tmp:
        for workers in sorted({1, args.workers}):
            out = Path(tmp) / f"workers{workers}"
            _, seconds = timed(lambda: prepare([str(args.file)], out, num_workers=workers, val_tokens=1_000_000,
                                               progress=False))
            prepared = sum(e["tokens"] for e in read_manifest(out)["shards"])
            assert prepared == tokens, (prepared, tokens)
            rows.append((f"gpt2repro prepare, {workers} worker{'s' * (workers > 1)}", prepared, seconds))
        # hashing every shard also brings them into memory, so the loader rows time the loader, not the disk
        _, seconds = timed(lambda: verify_data_dir(out))
        rows.append(("verify_data_dir (sha256 of every shard)", tokens, seconds))
        first_batch = {}
        for shuffle in (False, True):
            order = "shuffled" if shuffle else "file order"
            loader = TokenLoader(out, "train", 64, 1024, shuffle=shuffle, pin_memory=False)
            # shuffled, a shard's first window scans the shard for document starts: timed apart
            _, first_batch[order] = timed(loader.next_batch)
            _, seconds = timed(lambda: [loader.next_batch() for _ in range(args.batches)])
            rows.append((f"TokenLoader 64 x 1024, {order}", args.batches * 64 * 1024, seconds))
        train_tokens = sum(e["tokens"] for e in read_manifest(out)["shards"] if e["split"] == "train")

    print(f"file: {args.file.name}\n")
    print("| what | tokens | seconds | tokens/s |")
    print("| --- | ---: | ---: | ---: |")
    for what, count, seconds in rows:
        print(f"| {what} | {count:,} | {seconds:.2f} | {count / seconds:,.0f} |")
    print(f"\nfirst batch of a {train_tokens:,}-token shard: "
          + ", ".join(f"{order} {seconds:.3f} s" for order, seconds in first_batch.items()))


if __name__ == "__main__":
    main()
