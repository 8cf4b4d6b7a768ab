"""Token data: `prepare` turns documents into uint16 shards, `TokenLoader` reads them back in batches.

    DIR/manifest.json       tokenizer, source, settings, and per shard: split, tokens, documents, sha256
    DIR/val_000000.npy      the first `val_tokens` tokens of the stream (more files if they exceed a shard)
    DIR/train_000000.npy    the rest, `shard_size` tokens per file (the last one shorter)

The token stream is every document's tokens, each document preceded by `<|endoftext|>` (EOT).
Shards are plain `.npy` files, readable with `numpy.load(path, mmap_mode="r")`.

Preparing is resumable and never leaves a file that looks complete but is not: every shard is
written to `NAME.npy.tmp` and renamed when whole, then the manifest, itself replaced atomically,
records it together with the position in the document stream where the next shard starts. A
re-run with the same settings skips the documents already written; `complete` turns true last.

Loading: a *window* is B*T+1 consecutive tokens of one shard's token stream; windows advance by
B*T (x = window[:-1], y = window[1:]), and tokens at a shard's end that do not fill a window are
skipped. Windows are numbered globally through an epoch, independently of the world size, and
rank r's k-th micro-batch is window k*W + r. With G accumulation steps an optimizer step takes
the G*W consecutive windows from k*W, so every world size sees the same tokens per step, and a
position saved under one world size can resume under another. Past an epoch's last window the
next epoch begins.

Order: with `shuffle=True`, epoch e reads the shards in the order `default_rng([seed, e])
.permutation(num_shards)` and the documents of shard s (split at its EOT tokens; a shard that
starts mid-document has that fragment as its first piece) in the order `default_rng([seed, e, s])
.permutation(num_pieces)`. Orders are pure functions of (seed, epoch, shard), so the loader holds
no RNG state and a position is all a checkpoint needs. With `shuffle=False` shards and documents
stay in file order: the classic loader, reading each shard in consecutive windows.

Integrity: the loader checks every shard's presence, size, `.npy` header and recorded largest
token when it is built, and every window's largest token when it is read (an id outside the
vocabulary would otherwise crash the embedding on the GPU). Hashing every shard reads the whole data
set (20 GB for 10B tokens), so it does not hold up the start: `train` runs
`verify_in_background(DIR, "train")` once per machine, a thread whose Future raises on the first shard
that differs (about 2 s per GB on one core), and waits for it before its first checkpoint.
`gpt2repro prepare --out DIR --verify` checks a directory by hand, e.g. after copying it. A manifest
may name only plain file names inside DIR.
"""

from .loader import TokenLoader, validation_batches
from .manifest import describe_data_dir, open_split, read_manifest, verify_data_dir, verify_in_background
from .preparation import default_workers, encode_documents, prepare
from .sources import resolve_sources

__all__ = ["TokenLoader", "validation_batches", "describe_data_dir", "open_split", "read_manifest",
           "verify_data_dir", "verify_in_background", "default_workers", "encode_documents", "prepare", "resolve_sources"]
