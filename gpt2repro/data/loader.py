"""The shard loader: batches of B x T tokens, the same global batch per step for every world size."""

from __future__ import annotations

import collections
import hashlib
from pathlib import Path

import numpy as np
import torch

from ..config import EOT_TOKEN, GPT2_VOCAB_SIZE
from ..errors import UserError, first_line
from .manifest import open_split

class TokenLoader:
    """Batches of B x T tokens from one split; see the module docstring for order and sharding."""

    def __init__(self, data_dir, split: str, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
                 seed: int = 1337, shuffle: bool = True, vocab_size: int | None = None,
                 pin_memory: bool | None = None, verify: bool = False):
        if batch_size < 1 or seq_len < 1:
            raise UserError(f"batch size and sequence length must be positive, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is not in [0, world_size {world_size})")
        if seed < 0:
            raise UserError(f"the data seed must not be negative, got {seed}")
        self.data_dir, self.split = Path(data_dir).expanduser(), split
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.vocab_limit = min(vocab_size or GPT2_VOCAB_SIZE, GPT2_VOCAB_SIZE)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.shards = open_split(self.data_dir, split, self.vocab_limit, verify)
        self.tokens_per_window = batch_size * seq_len
        self.windows_per_shard = np.array([max(s.tokens - 1, 0) // self.tokens_per_window for s in self.shards])
        self.windows_per_epoch = int(self.windows_per_shard.sum())
        if self.windows_per_epoch == 0:
            largest = max(s.tokens for s in self.shards)
            hint = "prepare with a larger --val-tokens" if split == "val" else "use more data"
            raise UserError(f"the {split} split of {self.data_dir} ({largest:,} tokens in its largest shard) is too "
                            f"small for one {batch_size} x {seq_len} batch ({self.tokens_per_window + 1:,} tokens); "
                            f"lower the batch size or {hint}")
        self.data_sha256 = hashlib.sha256("".join(s.sha256 for s in self.shards).encode()).hexdigest()[:16]
        self._memmaps: dict[int, np.ndarray] = {}
        self._epoch_order: tuple[int, np.ndarray, np.ndarray] | None = None
        self._layouts: collections.OrderedDict = collections.OrderedDict()
        self._start = 0  # global window index of rank 0's first batch since construction or load_state_dict
        self._batches_taken = 0  # batches this rank has returned since then

    # -- position ---------------------------------------------------------------------------

    @property
    def position(self) -> int:
        """Windows taken by all ranks together (each rank having taken the same number)."""
        return self._start + self._batches_taken * self.world_size

    def state_dict(self) -> dict:
        epoch, window = divmod(self.position, self.windows_per_epoch)
        shard, local = self._locate(epoch, window)
        return {
            "split": self.split,
            "epoch": epoch,
            "window": window,  # next window of the epoch; rank r continues with window + r
            "shard": self.shards[shard].path.name,  # where that window lies, for people reading the file
            "token_offset": local * self.tokens_per_window,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "tokens_per_window": self.tokens_per_window,
            "data_sha256": self.data_sha256,
        }

    def load_state_dict(self, state: dict) -> None:
        try:
            epoch, window = int(state["epoch"]), int(state["window"])
            saved = {key: state[key] for key in ("split", "seed", "shuffle", "tokens_per_window", "data_sha256")}
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"data loader state is malformed ({first_line(e)})") from None
        current = {"split": self.split, "seed": self.seed, "shuffle": self.shuffle,
                   "tokens_per_window": self.tokens_per_window, "data_sha256": self.data_sha256}
        changed = [f"{key} {saved[key]!r} -> {current[key]!r}" for key in current if saved[key] != current[key]]
        if changed:
            raise UserError(f"data loader state does not fit this loader of {self.data_dir}: {'; '.join(changed)}")
        if epoch < 0 or not 0 <= window < self.windows_per_epoch:
            raise UserError(f"data loader state points at epoch {epoch}, window {window}, outside this data")
        self._start = epoch * self.windows_per_epoch + window
        self._batches_taken = 0

    # -- batches ----------------------------------------------------------------------------

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: (B, T) int64, y = x shifted by one token; pinned when `pin_memory`."""
        window = self.window(self.position + self.rank)
        self._batches_taken += 1
        batch = torch.empty((2, self.batch_size, self.seq_len), dtype=torch.int64, pin_memory=self.pin_memory)
        xy = batch.numpy()
        np.copyto(xy[0], window[:-1].reshape(self.batch_size, self.seq_len))
        np.copyto(xy[1], window[1:].reshape(self.batch_size, self.seq_len))
        return batch[0], batch[1]

    def window(self, index: int) -> np.ndarray:
        """Global window `index` (counting through all epochs): B*T+1 uint16 tokens."""
        epoch, in_epoch = divmod(index, self.windows_per_epoch)
        shard, local = self._locate(epoch, in_epoch)
        begin = local * self.tokens_per_window
        if self.shuffle:
            window = self._gather(shard, self._layout(epoch, shard), begin)
        else:
            window = self._memmap(shard)[begin : begin + self.tokens_per_window + 1]
        top = int(window.max())
        if top >= self.vocab_limit:
            raise UserError(f"shard {self.shards[shard].path} holds token id {top}, outside the vocabulary of "
                            f"{self.vocab_limit}; it is corrupt (check with gpt2repro prepare --verify)")
        return window

    def _locate(self, epoch: int, in_epoch: int) -> tuple[int, int]:
        """(shard index, window index inside the shard) of an epoch's window."""
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            order = (np.random.default_rng([self.seed, epoch]).permutation(len(self.shards)) if self.shuffle
                     else np.arange(len(self.shards)))
            self._epoch_order = (epoch, order, np.cumsum(self.windows_per_shard[order]))
        _, order, ends = self._epoch_order
        slot = int(np.searchsorted(ends, in_epoch, side="right"))
        return int(order[slot]), in_epoch - (int(ends[slot - 1]) if slot else 0)

    def _memmap(self, shard: int) -> np.ndarray:
        if shard not in self._memmaps:
            self._memmaps[shard] = np.load(self.shards[shard].path, mmap_mode="r")
        return self._memmaps[shard]

    def _layout(self, epoch: int, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """The shard's documents in this epoch's order: their starts in the file, their offsets in the stream."""
        key = (epoch, shard)
        if key not in self._layouts:
            tokens = self._memmap(shard)
            chunk = 1 << 24  # scan in 32 MB pieces: the shard is never in RAM as a whole
            eot = np.concatenate([np.flatnonzero(tokens[i : i + chunk] == EOT_TOKEN) + i
                                  for i in range(0, tokens.size, chunk)])
            starts = np.union1d([0], eot)  # a leading fragment of a document continued from the previous shard
            lengths = np.diff(np.append(starts, tokens.size))
            order = np.random.default_rng([self.seed, epoch, shard]).permutation(starts.size)
            self._layouts[key] = (starts[order], np.concatenate([[0], np.cumsum(lengths[order])]))
            if len(self._layouts) > 2:  # ranks move forward: the previous shard at most is still needed
                self._layouts.popitem(last=False)
        return self._layouts[key]

    def _gather(self, shard: int, layout: tuple[np.ndarray, np.ndarray], begin: int) -> np.ndarray:
        starts, offsets = layout
        tokens = self._memmap(shard)
        size = self.tokens_per_window + 1
        window = np.empty(size, dtype=np.uint16)
        piece = int(np.searchsorted(offsets, begin, side="right")) - 1
        filled = 0
        while filled < size:
            skip = begin + filled - int(offsets[piece])
            take = min(int(offsets[piece + 1] - offsets[piece]) - skip, size - filled)
            source = int(starts[piece]) + skip
            window[filled : filled + take] = tokens[source : source + take]
            filled += take
            piece += 1
        return window


def validation_batches(data_dir, batch_size: int, seq_len: int, num_batches: int, rank: int = 0,
                       world_size: int = 1, vocab_size: int | None = None, pin_memory: bool | None = None,
                       verify: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `num_batches` windows of the val split in file order; rank r gets windows r, r+W, ...

    The same windows on every call, so validation losses are comparable across a run and across runs.
    """
    loader = TokenLoader(data_dir, "val", batch_size, seq_len, rank=rank, world_size=world_size, shuffle=False,
                         vocab_size=vocab_size, pin_memory=pin_memory, verify=verify)
    if num_batches > loader.windows_per_epoch:
        raise UserError(f"the val split of {loader.data_dir} holds {loader.windows_per_epoch} batches of "
                        f"{batch_size} x {seq_len}, fewer than the {num_batches} asked for")
    return [loader.next_batch() for _ in range(rank, num_batches, world_size)]
