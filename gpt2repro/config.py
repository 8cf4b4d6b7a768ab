"""Configuration: the model shape (GPTConfig) with its named shapes, the training recipe
(TrainConfig) with its checks, and overrides from YAML or `--set` (the training presets and the
loading of a run's config are in presets.py).

Everything downstream (data, model, train, checkpoint, export) is built from these two dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field

import yaml

from .errors import UserError
from .io import is_hub_id

EOT_TOKEN = 50256  # <|endoftext|>, the document separator of GPT-2's tokenizer
GPT2_VOCAB_SIZE = 50257  # real GPT-2 vocabulary: 50,000 merges + 256 bytes + <|endoftext|>


@dataclass
class GPTConfig:
    """Shape of a GPT-2 model. Module and field names follow Hugging Face's GPT-2."""

    block_size: int = 1024  # maximum context length (number of learned position embeddings)
    vocab_size: int = 50304  # GPT-2's 50,257 padded up to a multiple of 128 for faster matmuls
    n_layer: int = 12  # number of transformer blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # width of the residual stream

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def real_vocab_size(self) -> int:
        """The tokens the model predicts: GPT-2's 50,257, never the rows padded on for speed."""
        return min(self.vocab_size, GPT2_VOCAB_SIZE)

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6 * (matmul parameters) + 6 * n_layer * n_embd * seq_len.

        The first term counts forward and backward through every weight matrix (the four per
        block and the tied output head); the second is causal attention's QK^T and AV products
        (half of the PaLM paper's 12*L*C*T, since the causal mask halves the work).
        """
        matmul_params = 12 * self.n_layer * self.n_embd**2 + self.vocab_size * self.n_embd
        return 6 * matmul_params + 6 * self.n_layer * self.n_embd * seq_len


MODEL_PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


@dataclass
class TrainConfig:
    """A training recipe. Batch sizes are counted in tokens where they are global."""

    model: GPTConfig = field(default_factory=GPTConfig)  # or a MODEL_PRESETS name in YAML / --set
    init_from: str = "scratch"  # starting weights: "scratch", a Hub id or directory of a GPT-2 (e.g. gpt2), or our
    #                             checkpoint, run or export; its shape replaces `model` (train/init_from.py)

    # batch: total_batch_size = micro_batch_size * seq_len * world_size * grad_accum_steps
    total_batch_size: int = 524288  # tokens per optimizer step over all processes (2**19, ~0.5M as in GPT-3 Small)
    micro_batch_size: int = 64  # sequences per forward pass on each process
    seq_len: int = 1024  # tokens per sequence; at most model.block_size

    # optimisation: GPT-3 paper settings
    max_lr: float = 6e-4  # peak learning rate, reached at the end of warmup
    min_lr: float = 6e-5  # floor of the cosine decay, 10% of max_lr
    warmup_steps: int = 715  # linear warmup (375M tokens / 2**19 tokens per step)
    max_steps: int = 19073  # cosine decay ends here (10B tokens / 2**19 tokens per step: one epoch)
    weight_decay: float = 0.1  # applied to 2-D tensors (matmul weights and embeddings) only
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # global gradient-norm clip; 0 disables clipping

    # numerics and speed
    mixed_precision: str = "auto"  # "bf16", "fp16", "no", or "auto": bf16 on a GPU that has it, else no
    tf32: bool = True  # allow TF32 for fp32 matmuls on Ampere and newer GPUs
    compile: bool = True  # torch.compile the training and validation forward (sampling and HellaSwag run eager)
    compile_scope: str = "block"  # "block": one Block graph that every layer reuses (a third of the compile time,
    #                               same step time on an H200); "model": one graph for the whole model
    attention: str = "auto"  # "auto": cuDNN + FlashAttention-4 kernels where installed and applicable; "sdpa": PyTorch's
    loss_chunk_rows: int = 8192  # rows of logits alive at once in the training loss; 0: the full (B*T, V) logits
    recompute_gelu: bool = True  # each MLP recomputes its GELU in backward (4.5 GiB less at 124M, B=64, T=1024)
    fused_mlp: bool = True  # the GELU inside quack's matmul epilogues where installed (the [gpu] extra) and applicable
    fused_norm: bool = True  # each Block's LayerNorm backward in quack's kernel with the residual gradient, likewise
    fused_residual: bool = True  # with fused_mlp and bf16_residual: the MLP's last matmul adds the residual stream
    #                               in its epilogue (0.65% faster at 124M; its curve is in BENCHMARKS.md)
    bf16_residual: bool = True  # under bf16 mixed precision the residual stream is bf16 (llm.c's arithmetic), not fp32:
    #                             3% faster and 1.2 GiB less at 124M, same curve (BENCHMARKS.md); false: fp32
    activation_checkpointing: bool = False  # each Block recomputes its forward in backward: far less memory, ~1/3 more compute
    cuda_graph: bool = True  # one process on a GPU: from the third step, each step is one CUDA graph replay (train/graph.py)

    # data
    shuffle: bool = True  # new seeded order of shards and documents every epoch; False walks the data in order
    seed: int = 1337  # seeds weights, data order and sampling

    # evaluation and samples (0 disables each); always also done after the last step
    val_every: int = 250  # optimizer steps between validation-loss passes
    val_batches: int = 20  # validation micro-batches (micro_batch_size x seq_len each) per pass, over all processes
    hellaswag_every: int = 250  # optimizer steps between HellaSwag evaluations
    hellaswag: str | None = None  # "auto" (download once, cached), a local jsonl path, or None to skip
    sample_every: int = 250  # optimizer steps between samples written to samples.txt
    num_samples: int = 4  # samples per process each time
    sample_max_new_tokens: int = 32  # tokens generated per sample
    sample_prompt: str = "Hello, I'm a language model,"  # prompt every sample starts from

    # checkpoints and control
    checkpoint_every: int = 5000  # optimizer steps between checkpoints (one is also written at the end)
    keep_checkpoints: int = 3  # newest checkpoints kept; older ones are deleted unless pinned
    pin_checkpoints: list[int] = field(default_factory=list)  # steps whose checkpoints are never deleted
    stop_after_steps: int = 0  # end this invocation after N optimizer steps with a checkpoint (0: run to max_steps)
    on_nonfinite: str = "stop"  # non-finite loss or grad norm: "stop" (keep last checkpoint) or "skip" the step
    log_every: int = 1  # optimizer steps between console/log.jsonl lines (each one syncs the GPU once)
    log_with: str | None = None  # extra Accelerate tracker: "tensorboard" (events in RUN/tensorboard/), "wandb" or "all"
    progress_bar: bool = True  # a progress bar on a terminal; off, or when output goes to a file, one plain line per log
    wandb_project: str = "gpt2repro"  # W&B project (also the subfolder of RUN/tensorboard/ the events go to)
    wandb_run_name: str | None = None  # W&B run name; null: the run directory's name
    wandb_tags: list[str] = field(default_factory=list)  # W&B tags
    push_to_hub: str | None = None  # USER/NAME: upload the exported model to this Hub repository (token: hf auth login)
    hub_strategy: str = "end"  # "end": the final model only; "every_save": every checkpoint, in the background

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-steps per optimizer step on each process, so one step sees total_batch_size tokens."""
        tokens_per_micro_step = self.micro_batch_size * self.seq_len * world_size
        if self.total_batch_size % tokens_per_micro_step:
            raise UserError(
                f"total_batch_size {self.total_batch_size} is not divisible by micro_batch_size * seq_len * "
                f"world_size = {self.micro_batch_size} * {self.seq_len} * {world_size} = {tokens_per_micro_step}"
            )
        return self.total_batch_size // tokens_per_micro_step

    def validate(self) -> "TrainConfig":
        problems = []
        m = self.model
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(m, name) <= 0:
                problems.append(f"model.{name} must be positive")
        if m.n_head > 0 and m.n_embd % m.n_head:
            problems.append(f"model.n_embd {m.n_embd} is not divisible by model.n_head {m.n_head}")
        if m.vocab_size < GPT2_VOCAB_SIZE:
            problems.append(f"model.vocab_size {m.vocab_size} is smaller than GPT-2's {GPT2_VOCAB_SIZE} tokens")
        for name in ("total_batch_size", "micro_batch_size", "seq_len", "max_steps"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        if self.seq_len > m.block_size:
            problems.append(f"seq_len {self.seq_len} exceeds model.block_size {m.block_size}")
        if self.micro_batch_size > 0 and self.seq_len > 0 and self.total_batch_size % (self.micro_batch_size * self.seq_len):
            problems.append(
                f"total_batch_size {self.total_batch_size} is not a multiple of micro_batch_size * seq_len "
                f"= {self.micro_batch_size * self.seq_len}"
            )
        if not 0 <= self.min_lr <= self.max_lr:
            problems.append(f"need 0 <= min_lr <= max_lr, got min_lr {self.min_lr}, max_lr {self.max_lr}")
        if not 0 <= self.warmup_steps <= self.max_steps:
            problems.append(f"warmup_steps {self.warmup_steps} must be between 0 and max_steps {self.max_steps}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            problems.append("beta1 and beta2 must be in [0, 1)")
        for name in ("weight_decay", "eps", "grad_clip"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative")
        if self.mixed_precision not in ("auto", "bf16", "fp16", "no"):
            problems.append(f"mixed_precision must be auto, bf16, fp16 or no, got {self.mixed_precision!r}")
        if self.attention not in ("auto", "sdpa"):
            problems.append(f"attention must be 'auto' or 'sdpa', got {self.attention!r}")
        if self.loss_chunk_rows < 0:
            problems.append("loss_chunk_rows must not be negative")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                problems.append(f"{f.name} must be a finite number, got {value}")
        if self.compile_scope not in ("model", "block"):
            problems.append(f"compile_scope must be 'model' or 'block', got {self.compile_scope!r}")
        if self.on_nonfinite not in ("stop", "skip"):
            problems.append(f"on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}")
        if not self.init_from.strip():
            problems.append("init_from must be 'scratch', a Hub model id or a directory")
        if self.push_to_hub is not None and not is_hub_id(self.push_to_hub, owner_required=True):
            problems.append(f"push_to_hub must look like USER/NAME, got {self.push_to_hub!r}")
        if self.hub_strategy not in ("end", "every_save"):
            problems.append(f"hub_strategy must be 'end' or 'every_save', got {self.hub_strategy!r}")
        if self.log_with not in (None, "tensorboard", "wandb", "all"):
            problems.append(f"log_with must be tensorboard, wandb, all or null, got {self.log_with!r}")
        for name in ("val_every", "val_batches", "hellaswag_every", "sample_every", "num_samples",
                     "sample_max_new_tokens", "checkpoint_every", "stop_after_steps"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative")
        if self.keep_checkpoints < 1:
            problems.append("keep_checkpoints must be at least 1")
        if self.log_every < 1:
            problems.append("log_every must be at least 1")
        if problems:
            raise UserError("invalid training config: " + "; ".join(problems))
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        return apply_overrides(cls(), values)


def did_you_mean(name: str, known) -> str:
    """The hint " (did you mean X?)" with the closest of `known` to a mistyped name, or ""."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def describe_keys() -> str:
    """Every --set key with its default, for `train --help`."""
    keys = [f"model.{f.name}" for f in dataclasses.fields(GPTConfig)]
    keys += [f.name for f in dataclasses.fields(TrainConfig) if f.name != "model"]
    return "  " + ", ".join(keys)


def _coerce(value, annotation, key: str):
    """Check a YAML / --set value against a field's annotation (string annotations, as written above)."""
    kind = annotation.replace(" ", "")
    optional = kind.endswith("|None")
    kind = kind.removesuffix("|None")
    if value is None:
        if optional:
            return None
        raise UserError(f"{key} cannot be null")
    if kind == "bool":
        if isinstance(value, bool):
            return value
    elif kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if math.isfinite(number):
                return number
    elif kind == "str":
        return str(value)
    elif kind == "list[str]":
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    elif kind == "list[int]":
        if isinstance(value, int) and not isinstance(value, bool):
            return [value]
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return value
    raise UserError(f"{key} must be {'a finite ' if kind == 'float' else ''}{kind}{' or null' if optional else ''}, got {value!r}")


def _set(obj, key: str, value, prefix: str = "") -> None:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    head, _, rest = key.partition(".")
    full = prefix + head
    if head not in fields:
        raise UserError(f"unknown config key {full!r}{did_you_mean(head, fields)}; known: {', '.join(sorted(fields))}")
    current = getattr(obj, head)
    if dataclasses.is_dataclass(current):
        if rest:
            _set(current, rest, value, full + ".")
        elif isinstance(value, str):
            if value not in MODEL_PRESETS:
                raise UserError(f"unknown model preset {value!r}{did_you_mean(value, MODEL_PRESETS)}; "
                                f"known: {', '.join(MODEL_PRESETS)}")
            setattr(obj, head, dataclasses.replace(MODEL_PRESETS[value]))
        elif isinstance(value, dict):
            for sub_key, sub_value in value.items():
                _set(current, str(sub_key), sub_value, full + ".")
        else:
            raise UserError(f"{full} must be a mapping or a model preset name, got {value!r}")
    elif rest:
        raise UserError(f"{full} has no sub-keys (got {key!r})")
    else:
        setattr(obj, head, _coerce(value, fields[head].type, full))


def apply_overrides(cfg, values: dict):
    """Apply a (possibly nested) mapping of overrides to a dataclass config, in place; every bad
    key or value is reported, together, in one UserError."""
    problems = []
    for key, value in values.items():
        try:
            _set(cfg, str(key), value)
        except UserError as e:
            problems.append(str(e))
    if problems:
        raise UserError("; ".join(problems))
    return cfg


def parse_set(items: list[str]) -> dict:
    """`["max_lr=1e-3", "model.n_layer=2"]` -> `{"max_lr": 1e-3, "model.n_layer": 2}` (values read as YAML)."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects key=value, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out
