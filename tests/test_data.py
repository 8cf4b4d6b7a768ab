import gzip
import hashlib
import json
import lzma
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from corpus import corpus, is_fixture
from gpt2repro.config import EOT_TOKEN
from gpt2repro.data import TokenLoader, describe_data_dir, prepare, read_manifest, validation_batches, verify_data_dir
from gpt2repro.data import preparation, sources
from gpt2repro.data.manifest import FORMAT, TOKENIZER, save_shard, shard_entry, write_manifest
from gpt2repro.errors import UserError
from gpt2repro.tokenizer import get_encoding

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

GUTENBERG_VAL = corpus("gutenberg_val.jsonl.xz")
SHAKESPEARE = corpus("tinyshakespeare.txt")
# the 4-book fixture (92,430 tokens) or the 40 books in ../shared (about 2.5M tokens): either way
# these settings give a validation shard and three training shards
GUTENBERG_BOOKS, GUTENBERG_SETTINGS = (
    (4, dict(shard_size=30_000, val_tokens=20_000)) if is_fixture(GUTENBERG_VAL)
    else (40, dict(shard_size=1_000_000, val_tokens=300_000))
)

B, T = 4, 8  # windows of 33 tokens on the synthetic data
BT = B * T


# ---------------------------------------------------------------------------------------------
# data the tests build


def write_data_dir(path: Path, shards: list[tuple[str, np.ndarray]]) -> Path:
    """A data directory holding exactly these token arrays, with a valid manifest."""
    path.mkdir(parents=True)
    entries, per_split = [], Counter()
    for split, tokens in shards:
        file = f"{split}_{per_split[split]:06d}.npy"
        per_split[split] += 1
        nbytes, sha256 = save_shard(path / file, tokens)
        entries.append(shard_entry(file, split, tokens, nbytes, sha256))
    write_manifest(path, {"format": FORMAT, "tokenizer": TOKENIZER, "source": {"sources": ["built by a test"]},
                          "complete": True, "resume": {"document": 0, "token": 0}, "shards": entries})
    return path


def unique_token_shards(sizes: list[int], seed: int = 0) -> list[np.ndarray]:
    """Shards of documents 5-40 tokens long whose non-EOT tokens are all distinct, so every token
    names its position. The second shard starts mid-document, as a prepared shard may."""
    rng = np.random.default_rng(seed)
    values = rng.permutation(EOT_TOKEN).astype(np.uint16)
    shards, used = [], 0
    for index, size in enumerate(sizes):
        tokens = values[used : used + size].copy()
        used += size
        position = 7 if index == 1 else 0
        while position < size:
            tokens[position] = EOT_TOKEN
            position += int(rng.integers(5, 40))
        shards.append(tokens)
    return shards


@pytest.fixture(scope="module")
def train_shards() -> list[np.ndarray]:
    # m*BT + 1 tokens per shard: an epoch's windows cover every token, none is skipped
    return unique_token_shards([40 * BT + 1, 25 * BT + 1, 31 * BT + 1])


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory, train_shards) -> Path:
    val = unique_token_shards([10 * BT + 1], seed=1)[0]
    return write_data_dir(tmp_path_factory.mktemp("synthetic") / "data",
                          [("val", val)] + [("train", s) for s in train_shards])


@pytest.fixture(scope="module")
def shakespeare_jsonl(tmp_path_factory) -> Path:
    """Tiny Shakespeare as one document per speech: real text, thousands of short documents."""
    speeches = [s for s in SHAKESPEARE.read_text().split("\n\n") if s.strip()]
    path = tmp_path_factory.mktemp("shakespeare") / "speeches.jsonl"
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in speeches))
    return path


@pytest.fixture(scope="module")
def gutenberg_dir(tmp_path_factory) -> Path:
    return prepare([str(GUTENBERG_VAL)], tmp_path_factory.mktemp("gutenberg") / "data", **GUTENBERG_SETTINGS,
                   num_workers=2)


def shard_tokens(data_dir: Path) -> np.ndarray:
    manifest = read_manifest(data_dir)
    return np.concatenate([np.load(data_dir / e["file"]) for e in manifest["shards"]])


def expected_stream(texts: list[str]) -> np.ndarray:
    encode = get_encoding().encode_ordinary
    return np.array([t for text in texts for t in [EOT_TOKEN] + encode(text)], dtype=np.uint16)


def window_ids(batches) -> list[bytes]:
    """A hashable identity for each batch (x and y together)."""
    return [x.numpy().tobytes() + y.numpy().tobytes() for x, y in batches]


# ---------------------------------------------------------------------------------------------
# prepare


def test_shards_hold_every_documents_tokens_after_one_eot(gutenberg_dir):
    texts = [json.loads(line)["text"] for line in lzma.open(GUTENBERG_VAL, "rt")]
    expected = expected_stream(texts)
    np.testing.assert_array_equal(shard_tokens(gutenberg_dir), expected)
    manifest = read_manifest(gutenberg_dir)
    assert [e["split"] for e in manifest["shards"]] == ["val", "train", "train", "train"]
    assert manifest["shards"][0]["tokens"] == GUTENBERG_SETTINGS["val_tokens"]
    assert sum(e["documents"] for e in manifest["shards"]) == len(texts) == GUTENBERG_BOOKS


def test_manifest_counts_and_sha256_match_the_files(gutenberg_dir):
    manifest = read_manifest(gutenberg_dir)
    assert manifest["tokenizer"] == TOKENIZER and manifest["complete"]
    assert manifest["source"]["sources"] == [str(GUTENBERG_VAL.resolve())]
    for entry in manifest["shards"]:
        path = gutenberg_dir / entry["file"]
        tokens = np.load(path, mmap_mode="r")
        assert tokens.dtype == np.uint16 and tokens.shape == (entry["tokens"],)
        assert entry["documents"] == np.count_nonzero(tokens == EOT_TOKEN)
        assert entry["max_token"] == tokens.max()
        assert entry["bytes"] == path.stat().st_size
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    verify_data_dir(gutenberg_dir)


def test_output_does_not_depend_on_the_number_of_workers(gutenberg_dir, tmp_path):
    single = prepare([str(GUTENBERG_VAL)], tmp_path / "one", **GUTENBERG_SETTINGS, num_workers=1)
    assert [e["sha256"] for e in read_manifest(single)["shards"]] == \
           [e["sha256"] for e in read_manifest(gutenberg_dir)["shards"]]


def test_txt_jsonl_gz_xz_and_parquet_sources_give_the_same_tokens(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [s for s in SHAKESPEARE.read_text().split("\n\n") if s.strip()][:40]
    lines = "".join(json.dumps({"body": t}) + "\n" for t in texts)
    (tmp_path / "books").mkdir()
    for i, text in enumerate(texts):
        (tmp_path / "books" / f"{i:03d}.txt").write_text(text)
    (tmp_path / "a.jsonl").write_text(lines)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    (tmp_path / "c.jsonl.xz").write_bytes(lzma.compress(lines.encode()))
    pq.write_table(pa.table({"body": texts}), tmp_path / "d.parquet")
    expected = expected_stream(texts)
    for source in ("books", "a.jsonl", "b.jsonl.gz", "c.jsonl.xz", "d.parquet"):
        out = prepare([str(tmp_path / source)], tmp_path / f"out_{source}", text_field="body", shard_size=500,
                      val_tokens=700, num_workers=1)
        np.testing.assert_array_equal(shard_tokens(out), expected, err_msg=source)


def test_interrupted_prepare_resumes_to_the_uninterrupted_output(shakespeare_jsonl, tmp_path, monkeypatch):
    settings = dict(shard_size=20_011, val_tokens=30_000, num_workers=2)
    reference = read_manifest(prepare([str(shakespeare_jsonl)], tmp_path / "whole", **settings))

    saved = []

    def crash_while_writing_the_fourth_shard(path, tokens):
        if len(saved) == 3:
            path.with_name(path.name + ".tmp").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        saved.append(path.name)
        return save_shard(path, tokens)

    monkeypatch.setattr(preparation, "save_shard", crash_while_writing_the_fourth_shard)
    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        prepare([str(shakespeare_jsonl)], out, **settings)
    manifest = read_manifest(out, require_complete=False)
    assert not manifest["complete"] and [e["file"] for e in manifest["shards"]] == saved
    assert manifest["resume"]["token"] > 0  # it stopped inside a document
    assert sorted(p.name for p in out.glob("*.npy")) == sorted(saved)
    with pytest.raises(UserError, match="incomplete"):
        TokenLoader(out, "train", B, T)

    monkeypatch.undo()
    before = {name: (out / name).stat() for name in saved}
    rewritten = []

    def record(path, tokens):
        rewritten.append(path.name)
        return save_shard(path, tokens)

    monkeypatch.setattr(preparation, "save_shard", record)
    prepare([str(shakespeare_jsonl)], out, **settings)
    monkeypatch.undo()
    # it resumed: the shards finished before the crash were neither rewritten nor touched
    assert rewritten == [e["file"] for e in reference["shards"]][len(saved):]
    for name, stat in before.items():
        assert ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    resumed = read_manifest(out)
    assert resumed["shards"] == reference["shards"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json"] + [e["file"] for e in reference["shards"]])

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    prepare([str(shakespeare_jsonl)], out, **settings)  # complete: nothing to do
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


def test_prepare_shows_a_progress_bar_in_tokens_with_documents_per_second(shakespeare_jsonl, tmp_path, capsys):
    out = prepare([str(shakespeare_jsonl)], tmp_path / "data", shard_size=100_000, val_tokens=10_000, num_workers=1,
                  progress=True)
    total = sum(e["tokens"] for e in read_manifest(out)["shards"])
    final = capsys.readouterr().err.split("\r")[-1]
    counted = re.search(r"([\d.]+)([kM]?)tok ", final)
    assert counted, final
    shown = float(counted.group(1)) * {"": 1, "k": 1e3, "M": 1e6}[counted.group(2)]
    assert shown == pytest.approx(total, rel=0.01)  # the bar counts tokens, not documents or groups
    assert re.search(r"tok/s", final) and re.search(r"[\d,]+ docs/s", final), final


def test_hub_dataset_is_streamed_through_datasets(tmp_path, monkeypatch):
    import datasets

    texts = [s for s in SHAKESPEARE.read_text().split("\n\n") if s.strip()][:30]
    calls = []

    def load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        return ({"text": t, "id": i} for i, t in enumerate(texts))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(sources, "_check_reachable", lambda endpoint, where: None)
    out = prepare(["HuggingFaceFW/fineweb-edu"], tmp_path / "data", name="sample-10BT", shard_size=500,
                  val_tokens=700, num_workers=1)
    # streamed, never downloaded whole: 10B tokens of text need not fit on disk or in memory
    assert calls and set(calls) == {("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)}
    np.testing.assert_array_equal(shard_tokens(out), expected_stream(texts))
    assert read_manifest(out)["source"]["sources"] == ["HuggingFaceFW/fineweb-edu"]


def test_other_settings_need_overwrite(shakespeare_jsonl, tmp_path):
    out = prepare([str(shakespeare_jsonl)], tmp_path / "data", shard_size=40_000, val_tokens=10_000, num_workers=1)
    with pytest.raises(UserError, match="other settings \\(shard_size differ\\)"):
        prepare([str(shakespeare_jsonl)], out, shard_size=20_000, val_tokens=10_000, num_workers=1)
    prepare([str(shakespeare_jsonl)], out, shard_size=20_000, val_tokens=10_000, num_workers=1, overwrite=True)
    train_sizes = [e["tokens"] for e in read_manifest(out)["shards"] if e["split"] == "train"]
    assert len(train_sizes) > 2 and set(train_sizes[:-1]) == {20_000} and train_sizes[-1] <= 20_000


# ---------------------------------------------------------------------------------------------
# the loader


def classic_windows(shards: list[np.ndarray], count: int):
    """The reference loader: shards in order, consecutive windows of BT+1 with stride BT, wrapping."""
    shard, position = 0, 0
    for _ in range(count):
        if position + BT + 1 > shards[shard].size:
            shard, position = (shard + 1) % len(shards), 0
        window = torch.from_numpy(shards[shard][position : position + BT + 1].astype(np.int64))
        yield window[:-1].view(B, T), window[1:].view(B, T)
        position += BT


def test_unshuffled_order_is_the_classic_sequential_loader(synthetic_dir, train_shards):
    loader = TokenLoader(synthetic_dir, "train", B, T, shuffle=False)
    count = loader.windows_per_epoch * 3 // 2
    batches = (loader.next_batch() for _ in range(count))
    for (x, y), (x_ref, y_ref) in zip(batches, classic_windows(train_shards, count)):
        torch.testing.assert_close(x, x_ref, rtol=0, atol=0)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=0)


def test_batches_are_int64_with_targets_shifted_by_one(synthetic_dir):
    x, y = TokenLoader(synthetic_dir, "train", B, T).next_batch()
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    torch.testing.assert_close(x.flatten()[1:], y.flatten()[:-1], rtol=0, atol=0)
    y[0, 0] = -1  # x and y do not share memory: masking targets in place cannot corrupt inputs
    assert x.min() >= 0


def step_batches(data_dir, world_size: int, steps: int, windows_per_step: int = 4, **options) -> list[list[bytes]]:
    """Each optimizer step's micro-batches over all ranks, in global window order."""
    accumulation = windows_per_step // world_size
    loaders = [TokenLoader(data_dir, "train", B, T, rank=r, world_size=world_size, **options)
               for r in range(world_size)]
    steps_out = []
    for _ in range(steps):
        per_rank = [window_ids(loader.next_batch() for _ in range(accumulation)) for loader in loaders]
        steps_out.append([per_rank[r][k] for k in range(accumulation) for r in range(world_size)])
    return steps_out


@pytest.mark.parametrize("shuffle", [True, False])
def test_world_sizes_see_identical_global_batches(synthetic_dir, shuffle):
    steps = 30  # 120 windows: into the second epoch of 96
    one_process = step_batches(synthetic_dir, 1, steps, shuffle=shuffle)
    for world_size in (2, 4):
        assert step_batches(synthetic_dir, world_size, steps, shuffle=shuffle) == one_process


def test_ranks_take_disjoint_windows_covering_the_step(synthetic_dir):
    world_size, steps = 4, 10
    loaders = [TokenLoader(synthetic_dir, "train", B, T, rank=r, world_size=world_size) for r in range(world_size)]
    reference = TokenLoader(synthetic_dir, "train", B, T)
    for _ in range(steps):
        step = [x for loader in loaders for x, _ in [loader.next_batch(), loader.next_batch()]]
        tokens = torch.cat([x.flatten() for x in step])
        positional = tokens[tokens != EOT_TOKEN]
        assert positional.unique().numel() == positional.numel()  # no token position taken twice
        global_batch = torch.cat([reference.next_batch()[0].flatten() for _ in range(2 * world_size)])
        assert Counter(tokens.tolist()) == Counter(global_batch.tolist())


def epoch_windows(loader: TokenLoader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(loader.windows_per_epoch)]


def test_one_epoch_visits_every_window_once_keeping_documents_whole(synthetic_dir, train_shards):
    loader = TokenLoader(synthetic_dir, "train", B, T, seed=7)
    windows = epoch_windows(loader)
    x_tokens = torch.cat([x.flatten() for x, _ in windows])
    positional = x_tokens[x_tokens != EOT_TOKEN]
    assert positional.unique().numel() == positional.numel()  # nothing seen twice
    everything = np.concatenate(train_shards)
    # each shard's last token is only ever a target; all others are inputs exactly once
    assert positional.numel() == np.count_nonzero(everything != EOT_TOKEN) - len(train_shards)
    # documents are shuffled as wholes: inside a window every token follows its predecessor in the file
    predecessor = {}
    for shard in train_shards:
        predecessor.update(zip(shard[1:].tolist(), shard[:-1].tolist()))
    for x, y in windows:
        window = torch.cat([x.flatten(), y.flatten()[-1:]]).tolist()
        for previous, token in zip(window, window[1:]):
            assert token == EOT_TOKEN or token not in predecessor or predecessor[token] == previous


def test_documents_inside_a_single_shard_are_reordered_every_epoch(tmp_path):
    shard, val = unique_token_shards([40 * BT + 1, 10 * BT + 1])
    one_shard = write_data_dir(tmp_path / "one", [("val", val), ("train", shard)])
    loader = TokenLoader(one_shard, "train", B, T, seed=7)
    first, second = epoch_windows(loader), epoch_windows(loader)
    in_file_order = window_ids(classic_windows([shard], loader.windows_per_epoch))
    # with one shard there is no shard order to permute: any change comes from the documents
    assert len({tuple(window_ids(first)), tuple(window_ids(second)), tuple(in_file_order)}) == 3


def test_shards_are_only_ever_memory_mapped(synthetic_dir, monkeypatch):
    modes = []
    load = np.load

    def recording_load(*args, **kwargs):
        modes.append(kwargs.get("mmap_mode"))
        return load(*args, **kwargs)

    monkeypatch.setattr(np, "load", recording_load)
    loader = TokenLoader(synthetic_dir, "train", B, T, seed=3)
    epoch_windows(loader)
    TokenLoader(synthetic_dir, "train", B, T, shuffle=False).next_batch()
    validation_batches(synthetic_dir, B, T, num_batches=3)
    assert len(modes) >= 3 and set(modes) == {"r"}


def test_two_epochs_differ_in_order_not_content(synthetic_dir, train_shards):
    loader = TokenLoader(synthetic_dir, "train", B, T, seed=7)
    first, second = epoch_windows(loader), epoch_windows(loader)
    assert window_ids(first) != window_ids(second)

    def content(windows):
        tokens = torch.cat([torch.cat([x.flatten(), y.flatten()]) for x, y in windows])
        documents = sum(int((x == EOT_TOKEN).sum()) for x, _ in windows)
        return set(tokens[tokens != EOT_TOKEN].tolist()), documents

    everything = np.concatenate(train_shards)
    assert content(first) == content(second) == (set(everything[everything != EOT_TOKEN].tolist()),
                                                 np.count_nonzero(everything == EOT_TOKEN))


def test_resume_continues_with_the_batches_of_an_uninterrupted_run(synthetic_dir):
    world_size, taken = 2, 45  # 90 of the epoch's 96 windows: the continuation crosses into epoch 1
    options = dict(seed=11, shuffle=True)
    running = [TokenLoader(synthetic_dir, "train", B, T, rank=r, world_size=world_size, **options) for r in range(2)]
    for loader in running:
        for _ in range(taken):
            loader.next_batch()
    state = json.loads(json.dumps(running[0].state_dict()))  # it goes into a JSON checkpoint
    assert (state["epoch"], state["window"]) == (0, 90)

    position = taken * world_size
    single = TokenLoader(synthetic_dir, "train", B, T, **options)
    uninterrupted = window_ids(single.next_batch() for _ in range(position + 24))
    for new_world_size in (1, 2, 4):
        for rank in range(new_world_size):
            resumed = TokenLoader(synthetic_dir, "train", B, T, rank=rank, world_size=new_world_size, **options)
            resumed.load_state_dict(state)
            got = window_ids(resumed.next_batch() for _ in range(24 // new_world_size))
            assert got == [uninterrupted[position + k * new_world_size + rank] for k in range(24 // new_world_size)]
            if new_world_size == world_size:
                assert got == window_ids(running[rank].next_batch() for _ in range(len(got)))


def test_state_from_another_seed_or_batch_shape_is_refused(synthetic_dir):
    state = TokenLoader(synthetic_dir, "train", B, T, seed=1).state_dict()
    with pytest.raises(UserError, match="seed 1 -> 2"):
        TokenLoader(synthetic_dir, "train", B, T, seed=2).load_state_dict(state)
    with pytest.raises(UserError, match="tokens_per_window 32 -> 64"):
        TokenLoader(synthetic_dir, "train", B, 2 * T, seed=1).load_state_dict(state)


def test_validation_batches_are_the_first_windows_split_over_ranks(synthetic_dir):
    all_windows = window_ids(validation_batches(synthetic_dir, B, T, num_batches=5))
    assert all_windows == window_ids(validation_batches(synthetic_dir, B, T, num_batches=5))
    val = np.load(synthetic_dir / "val_000000.npy")
    assert all_windows[0] == window_ids([(torch.from_numpy(val[:BT].astype(np.int64)).view(B, T),
                                          torch.from_numpy(val[1 : BT + 1].astype(np.int64)).view(B, T))])[0]
    rank0 = window_ids(validation_batches(synthetic_dir, B, T, 5, rank=0, world_size=2))
    rank1 = window_ids(validation_batches(synthetic_dir, B, T, 5, rank=1, world_size=2))
    assert rank0 == all_windows[0::2] and rank1 == all_windows[1::2]


def test_loader_reads_real_prepared_data(gutenberg_dir):
    tokens = np.concatenate([np.load(gutenberg_dir / f"train_{i:06d}.npy") for i in range(3)])
    x, y = TokenLoader(gutenberg_dir, "train", 8, 64, shuffle=False, vocab_size=50304).next_batch()
    np.testing.assert_array_equal(x.flatten().numpy(), tokens[: 8 * 64])
    x, y = TokenLoader(gutenberg_dir, "train", 8, 64, vocab_size=50304).next_batch()
    window = np.concatenate([x.flatten().numpy(), y.flatten()[-1:].numpy()])
    assert Counter(window.tolist()) <= Counter(tokens.tolist())  # pieces of the shards' documents
    assert len(validation_batches(gutenberg_dir, 8, 64, 20)) == 20


# ---------------------------------------------------------------------------------------------
# bad input: one line, no traceback, nothing half-written


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message and "\n" not in message
    return message


def test_loader_refuses_missing_truncated_and_out_of_vocabulary_data(tmp_path, synthetic_dir, train_shards):
    with pytest.raises(UserError, match="does not exist") as error:
        TokenLoader(tmp_path / "nowhere", "train", B, T)
    one_line(error)

    with pytest.raises(UserError, match="outside the vocabulary of 1000") as error:
        TokenLoader(synthetic_dir, "train", B, T, vocab_size=1000)
    assert "train_000000.npy" in one_line(error)

    with pytest.raises(UserError, match=r"too small for one 64 x 64 batch \(4,097 tokens\)") as error:
        validation_batches(synthetic_dir, 64, 64, 1)
    one_line(error)
    with pytest.raises(UserError, match="holds 10 batches of 4 x 8, fewer than the 11 asked for"):
        validation_batches(synthetic_dir, B, T, 11)

    # a shard whose manifest hides an out-of-range id is caught when its window is read
    bad = train_shards[0].copy()
    bad[5] = 60000
    lying = write_data_dir(tmp_path / "lying", [("train", bad)])
    manifest = json.loads((lying / "manifest.json").read_text())
    manifest["shards"][0]["max_token"] = EOT_TOKEN
    (lying / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="token id 60000, outside the vocabulary of 50257") as error:
        TokenLoader(lying, "train", B, T, shuffle=False).next_batch()
    one_line(error)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "gpt2repro", "prepare", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def assert_fails_in_one_line(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode != 0
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert fragment in result.stderr


def damaged_copy(source: Path, target: Path, damage) -> Path:
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    damage(target)
    return target


def truncate(data_dir: Path) -> None:
    path = data_dir / "train_000001.npy"
    path.write_bytes(path.read_bytes()[:-2])


def flip_a_byte(data_dir: Path) -> None:
    path = data_dir / "train_000001.npy"
    content = bytearray(path.read_bytes())
    content[-1] ^= 0x01
    path.write_bytes(bytes(content))


def edit_manifest(change):
    def damage(data_dir: Path) -> None:
        manifest = json.loads((data_dir / "manifest.json").read_text())
        change(manifest)
        (data_dir / "manifest.json").write_text(json.dumps(manifest))
    return damage


@pytest.mark.slow
@pytest.mark.parametrize("damage, fragment", [
    (truncate, "train_000001.npy is truncated or damaged: 1,728 bytes, the manifest says 1,730"),
    (flip_a_byte, "train_000001.npy is corrupt: its sha256 differs from the manifest's"),
    (edit_manifest(lambda m: m["tokenizer"].update(id="cl100k_base")), "made with tokenizer 'cl100k_base'"),
    (edit_manifest(lambda m: m["shards"][1].update(max_token=50300)), "holds token id 50300, outside the vocabulary"),
], ids=["truncated", "corrupt", "other-tokenizer", "token-out-of-vocabulary"])
def test_verify_reports_a_damaged_data_directory_in_one_line(synthetic_dir, tmp_path, damage, fragment):
    damaged = damaged_copy(synthetic_dir, tmp_path / "damaged", damage)
    assert_fails_in_one_line(run_cli("--out", str(damaged), "--verify"), fragment)


@pytest.mark.slow
def test_bad_sources_fail_in_one_line_before_writing_anything(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": "fine too"}\n{"text": unquoted}\n')
    (tmp_path / "untitled.jsonl").write_text('{"title": "no text here"}\n')
    cases = [
        (["--source", str(tmp_path / "no_such_dir/")], "does not exist"),
        (["--source", str(tmp_path / "empty.jsonl")], "empty.jsonl holds no documents"),
        (["--source", str(tmp_path / "untitled.jsonl")], "untitled.jsonl:1: no 'text' field (fields: title)"),
        (["--source", "HuggingFaceFW/fineweb-edu", "--name", "sample-10BT"], "offline mode is on"),
    ]
    for args, fragment in cases:
        out = tmp_path / "out"
        assert_fails_in_one_line(run_cli(*args, "--out", str(out)), fragment)
        assert not out.exists()

    # a malformed line after the first is found while writing; nothing looks complete afterwards
    out = tmp_path / "out"
    assert_fails_in_one_line(run_cli("--source", str(tmp_path / "broken.jsonl"), "--out", str(out)),
                             "broken.jsonl:3: not valid JSON")
    assert not list(out.glob("*.npy*")) and not read_manifest(out, require_complete=False)["complete"]
    assert_fails_in_one_line(run_cli("--out", str(tmp_path / "missing"), "--verify"), "does not exist")


@pytest.mark.parametrize("damage, fragment", [
    (edit_manifest(lambda m: m["tokenizer"].update(bpe_sha256="0" * 64)), "(BPE sha256 000000000000...), not GPT-2's"),
    (edit_manifest(lambda m: m.update(tokenizer="cl100k_base")), "made with tokenizer 'cl100k_base'"),
    (lambda data_dir: None, "the val split of"),
], ids=["other-bpe", "other-tokenizer-by-name", "val-smaller-than-one-batch"])
def test_train_refuses_unusable_data_in_one_line_before_writing(synthetic_dir, tmp_path, capsys, damage, fragment):
    from gpt2repro.__main__ import main

    # the tiny preset's 8 x 128 windows fit the train split (1 window) but not the 321-token val split
    damaged = damaged_copy(synthetic_dir, tmp_path / "data", damage)
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", str(damaged), "--out", str(run),
                 "--set", "model.n_layer=2", "model.n_embd=32", "model.n_head=2"]) != 0
    error = capsys.readouterr().err
    assert len(error.splitlines()) == 1 and fragment in error, error
    if "val" in fragment:
        assert "too small for one 8 x 128 batch (1,025 tokens)" in error and "--val-tokens" in error
    assert not run.exists()


def test_the_summary_counts_documents_and_shards_in_words_that_add_up(tmp_path):
    text = tmp_path / "book.txt"
    text.write_text(SHAKESPEARE.read_text()[:20000])  # one document, cut by the val/train boundary
    out = prepare([str(text)], tmp_path / "data", val_tokens=1000, num_workers=1, progress=False)
    summary = describe_data_dir(out)
    assert "val: 1,000 tokens, 1 document, 1 shard;" in summary, summary
    assert "0 documents and the end of one begun in val, 1 shard" in summary, summary
