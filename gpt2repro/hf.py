"""Hugging Face interop: GPT <-> GPT2LMHeadModel, export directories, tokenizer files, model cards.

Our module names equal Hugging Face's; the differences are that HF's Conv1D stores weights as
(in, out) where nn.Linear stores (out, in), that HF's vocabulary is GPT-2's 50,257 where ours may
be padded to 50,304, and that HF keeps no separate lm_head.weight in its files (it is tied).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import yaml
from transformers import GPT2LMHeadModel, GPT2TokenizerFast

from .config import EOT_TOKEN, GPTConfig
from .errors import UserError
from .model import GPT
from .tokenizer import mergeable_ranks

# weights stored transposed by HF's Conv1D
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.json", "merges.txt", "README.md",
)


def _is_hub_id(source: str) -> bool:
    parts = source.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not source.startswith((".", "~")) and " " not in source


def load_hf_model(source) -> GPT2LMHeadModel:
    """A GPT2LMHeadModel from an instance, a local directory or a Hub id, with one-line errors."""
    if isinstance(source, GPT2LMHeadModel):
        return source
    if hasattr(source, "config") and hasattr(source, "state_dict"):
        GPTConfig.from_hf_config(source.config)  # raises the one-line "not a GPT-2 config" error
        return source
    from transformers import AutoConfig

    source = str(source)
    local = Path(source).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise UserError(f"{local} is not a Hugging Face model directory (no config.json)")
    elif not _is_hub_id(source):
        raise UserError(f"{source} is neither a local directory nor a Hugging Face Hub model id")
    try:
        hf_config = AutoConfig.from_pretrained(source)
    except Exception as e:  # OSError, ValueError, or a config validation error, depending on the cause
        raise _load_error(source, local, e) from None
    try:
        GPTConfig.from_hf_config(hf_config)
    except UserError as e:
        raise UserError(f"{source} is {e}") from None  # "PATH is not a GPT-2 config: ..."
    try:
        return GPT2LMHeadModel.from_pretrained(source, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise _load_error(source, local, e) from None


def _load_error(source: str, local: Path, error: Exception) -> UserError:
    if local.exists():
        return UserError(f"cannot load {local} as a GPT-2 model: {str(error).strip().splitlines()[0]}")
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    reason = "HF_HUB_OFFLINE is set" if offline else "no network or no such repository"
    return UserError(f"cannot download {source!r} from the Hugging Face Hub ({reason}); pass a local model directory instead")


def gpt_from_hf(source) -> GPT:
    hf_model = load_hf_model(source)
    config = GPTConfig.from_hf_config(hf_model.config)
    model = GPT(config)
    state = {}
    for name, tensor in hf_model.state_dict().items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers of older transformers versions
        tensor = tensor.detach().to(torch.float32)
        state[name] = tensor.t() if name.endswith(CONV1D_SUFFIXES) else tensor
    model.load_weights(state, source=f"Hugging Face model {getattr(source, 'name_or_path', source)}")
    return model


def gpt_to_hf(model: GPT) -> GPT2LMHeadModel:
    hf_config = model.config.to_hf_config()
    hf_model = GPT2LMHeadModel(hf_config)
    state = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to(torch.float32)
        if name.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        elif name in ("transformer.wte.weight", "lm_head.weight"):
            tensor = tensor[: hf_config.vocab_size]
        state[name] = tensor.contiguous()
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:  # the two modules are one architecture; anything else is a bug here
        raise RuntimeError(f"GPT -> GPT2LMHeadModel mismatch: missing {missing}, unexpected {unexpected}")
    hf_model.tie_weights()
    return hf_model.eval()


# ---------------------------------------------------------------------------------------------
# tokenizer files, generated from the vendored BPE ranks


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used in vocab.json and merges.txt."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _merge_parts(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair whose merge creates `token`: byte-pair encode it with the merges ranked before it."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < limit and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            break
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise RuntimeError(f"cannot recover the merge that forms token {token!r}")
    return parts[0], parts[1]


@functools.cache
def vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    ranks = mergeable_ranks()
    to_char = _byte_to_unicode()

    def text(token: bytes) -> str:
        return "".join(to_char[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab["<|endoftext|>"] = EOT_TOKEN
    merges = [
        tuple(text(part) for part in _merge_parts(token, ranks))
        for token, _ in sorted(ranks.items(), key=lambda item: item[1])
        if len(token) > 1
    ]
    return vocab, merges


def build_hf_tokenizer() -> GPT2TokenizerFast:
    """GPT-2's tokenizer as a `transformers` fast tokenizer, built with no download."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab, merges = vocab_and_merges()
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split regex
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    return GPT2TokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=1024,
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,  # byte-level BPE decodes exactly; clean-up would drop spaces
    )


def write_tokenizer_files(out_dir: Path, model_max_length: int = 1024) -> None:
    tokenizer = build_hf_tokenizer()
    tokenizer.model_max_length = model_max_length
    tokenizer.save_pretrained(out_dir)
    vocab, merges = vocab_and_merges()
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# model card


def model_card(
    model: GPT,
    train_config: dict | None = None,
    metrics: dict | None = None,
    model_name: str = "gpt2repro-gpt2",
    datasets: list[str] | None = None,
) -> str:
    """README.md with Hub metadata; eval results in `metrics` become `model-index` entries.

    Recognised metric keys: val_loss, hellaswag_acc, hellaswag_acc_norm (others are listed in the text).
    """
    metrics = dict(metrics or {})
    meta: dict = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "license": "mit",
        "language": ["en"],
        "tags": ["gpt2", "gpt2repro", "text-generation"],
    }
    if datasets:
        meta["datasets"] = list(datasets)
    results = []
    hellaswag = [
        {"type": "acc", "name": "accuracy", "value": float(metrics[k])} if k == "hellaswag_acc"
        else {"type": "acc_norm", "name": "normalized accuracy", "value": float(metrics[k])}
        for k in ("hellaswag_acc", "hellaswag_acc_norm") if k in metrics
    ]
    if hellaswag:
        results.append({
            "task": {"type": "text-generation", "name": "Text Generation"},
            "dataset": {"type": "Rowan/hellaswag", "name": "HellaSwag", "split": "validation"},
            "metrics": hellaswag,
        })
    if "val_loss" in metrics:
        results.append({
            "task": {"type": "text-generation", "name": "Text Generation"},
            "dataset": {"type": "validation-split", "name": metrics.get("val_dataset", "held-out validation split")},
            "metrics": [{"type": "loss", "name": "validation loss", "value": float(metrics["val_loss"])}],
        })
    if results:
        meta["model-index"] = [{"name": model_name, "results": results}]

    c = model.config
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
        f"# {model_name}", "",
        f"A GPT-2 model ({model.num_params():,} parameters: {c.n_layer} layers, {c.n_head} heads, "
        f"width {c.n_embd}, context {c.block_size}) trained from scratch with gpt2repro. "
        "It is a plain `GPT2LMHeadModel` with GPT-2's tokenizer:", "",
        "```python", "from transformers import pipeline", "",
        'generator = pipeline("text-generation", model="PATH_OR_REPO_ID")',
        'print(generator("Hello, I\'m a language model,", max_new_tokens=32, do_sample=True, top_k=50))',
        "```", "",
    ]
    if metrics:
        lines += ["## Evaluation", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
        lines.append("")
    if train_config:
        lines += ["## Training configuration", "", "```yaml", yaml.safe_dump(train_config, sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


def save_hf(
    model: GPT,
    out_dir: str | Path,
    train_config: dict | None = None,
    metrics: dict | None = None,
    model_name: str | None = None,
) -> Path:
    """Write a directory `transformers` loads as is: weights, config, generation config, tokenizer, card.

    Written into a temporary sibling and renamed, so a failure never leaves a half-written export.
    An existing out_dir is replaced only when it holds nothing but an earlier export's files: it
    could be a run, a checkpoint or a clone of a Hub repository, none of which may be deleted.
    """
    from transformers import GenerationConfig

    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists():
        if not out_dir.is_dir():
            raise UserError(f"{out_dir} exists and is not a directory; choose another output directory")
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in HF_FILES)
        if foreign:
            raise UserError(
                f"{out_dir} already holds files that are not part of an export ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); choose another output directory"
            )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        hf_model = gpt_to_hf(model)
        hf_model.generation_config = GenerationConfig(
            bos_token_id=EOT_TOKEN, eos_token_id=EOT_TOKEN, pad_token_id=EOT_TOKEN,
            do_sample=True, top_k=50,
        )
        hf_model.save_pretrained(tmp, safe_serialization=True)
        write_tokenizer_files(tmp, model_max_length=model.config.block_size)
        card = model_card(model, train_config, metrics, model_name=model_name or out_dir.name)
        (tmp / "README.md").write_text(card)
        tmp.chmod(0o755)  # mkdtemp makes it private; an export is an ordinary directory
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_model(source) -> GPT:
    """Any model the command line accepts: our checkpoint dir, a run dir (its newest checkpoint),
    an HF export dir, or a Hub id."""
    from .checkpoint import is_checkpoint_dir, load_model_dir
    from .export import resolve_checkpoint

    if is_checkpoint_dir(source):
        return load_model_dir(source)
    if isinstance(source, (str, Path)) and (Path(source).expanduser() / "checkpoints").is_dir():
        return load_model_dir(resolve_checkpoint(source))
    return gpt_from_hf(source)


# ---------------------------------------------------------------------------------------------
# the Hub


def upload_plan(model_dir) -> list[tuple[str, int]]:
    """(relative path, bytes) of every file push_to_hub uploads: all files of an export, hidden ones aside."""
    model_dir = Path(model_dir).expanduser()
    if not model_dir.is_dir():
        raise UserError(f"{model_dir} is not a directory")
    missing = [name for name in HF_FILES if not (model_dir / name).is_file()]
    if missing:
        raise UserError(f"{model_dir} is not a gpt2repro export (missing {', '.join(missing)}); run gpt2repro export first")
    files = []
    for path in sorted(model_dir.rglob("*")):
        relative = path.relative_to(model_dir)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            files.append((relative.as_posix(), path.stat().st_size))
    return files


def push_to_hub(model_dir, repo_id: str, private: bool = False, revision: str | None = None, dry_run: bool = False) -> dict:
    """Upload an export directory to a Hub model repository (created if needed) in one commit.

    The token is the usual one (`hf auth login`, or HF_TOKEN). Returns what is (or with dry_run,
    would be) uploaded: {"repo_id", "private", "revision", "files": [(path, bytes)], "card"}, plus
    "url" of the commit after a real push.
    """
    model_dir = Path(model_dir).expanduser()
    files = upload_plan(model_dir)
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts) or " " in repo_id:
        raise UserError(f"--repo-id must look like USER/NAME, got {repo_id!r}")
    plan = {
        "repo_id": repo_id, "private": private, "revision": revision or "main",
        "files": files, "card": (model_dir / "README.md").read_text(encoding="utf-8"),
    }
    if dry_run:
        return plan
    import huggingface_hub

    if huggingface_hub.get_token() is None:
        raise UserError("no Hugging Face token: log in with `hf auth login` or set HF_TOKEN")
    api = huggingface_hub.HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, repo_type="model", folder_path=model_dir, revision=revision,
            allow_patterns=[name for name, _ in files], commit_message="Upload GPT-2 model trained with gpt2repro",
        )
    # huggingface_hub raises its own HTTP errors, OSError subclasses and its HTTP client's errors; all
    # mean the same to a user here: the push did not happen, for the reason in the first line
    except Exception as e:  # noqa: BLE001
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot push to {repo_id} on the Hugging Face Hub: {reason}") from None
    plan["url"] = getattr(commit, "commit_url", None) or str(commit)
    return plan
