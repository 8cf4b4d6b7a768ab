"""Evaluation during training: validation loss, HellaSwag and samples, at their cadence and after the
last step. Every process makes the same number of forward calls, which a sharded (FSDP) forward needs."""

from __future__ import annotations

import math

import torch
from accelerate.utils import gather_object

from ..config import TrainConfig
from ..data import validation_batches
from ..eval.hellaswag import evaluate_hellaswag
from ..eval.hellaswag_data import load_hellaswag
from ..eval.validation import validation_loss
from ..tokenizer import encode_prompt, get_encoding

HELLASWAG_KEYS = ("hellaswag_acc", "hellaswag_acc_norm_tokens", "hellaswag_acc_norm", "hellaswag_n")


class EvalHooks:
    def __init__(self, cfg: TrainConfig, data_dir, accelerator):
        self.cfg, self.accelerator = cfg, accelerator
        self.rank, self.world_size, self.device = accelerator.process_index, accelerator.num_processes, accelerator.device
        self.val_batches, self.hellaswag = None, None
        if data_dir is not None and cfg.val_every and cfg.val_batches:
            self.val_batches = validation_batches(
                data_dir, cfg.micro_batch_size, cfg.seq_len, cfg.val_batches, rank=self.rank,
                world_size=self.world_size, vocab_size=cfg.model.vocab_size,
            )
        if cfg.hellaswag and cfg.hellaswag_every:
            with accelerator.main_process_first():  # rank 0 downloads, the others find the cache filled
                self.hellaswag = load_hellaswag(cfg.hellaswag)

    def _due(self, every: int, step: int, final: bool) -> bool:
        return bool(every) and (final or step % every == 0)

    def evaluate(self, model, step: int, final: bool = False) -> dict:
        """Validation loss and HellaSwag of `model` (the prepared model) where due at `step`."""
        cfg, results = self.cfg, {}
        if self.val_batches is not None and self._due(cfg.val_every, step, final):
            results["val_loss"] = self.validation_loss(model)
        if self.hellaswag and self._due(cfg.hellaswag_every, step, final):
            with torch.no_grad(), self.accelerator.autocast(), torch.compiler.set_stance("force_eager"):
                scores = evaluate_hellaswag(
                    lambda idx: model(idx)[0], self.hellaswag, self.device, rank=self.rank,
                    world_size=self.world_size, all_reduce=self._sum, progress=False, pad_to=cfg.model.block_size,
                )
            results.update({k: scores[k] for k in HELLASWAG_KEYS})
        return results

    def validation_loss(self, model) -> float:
        cfg = self.cfg

        def loss(x, y):
            with self.accelerator.autocast():
                return model(x.to(self.device), y.to(self.device))[1]

        blank = torch.zeros(cfg.micro_batch_size, cfg.seq_len, dtype=torch.long)
        return validation_loss(loss, self.val_batches, all_reduce=self._sum, device=self.device,
                               forwards=math.ceil(cfg.val_batches / self.world_size), blank=(blank, blank))

    def sample_due(self, step: int, final: bool = False) -> bool:
        return bool(self.cfg.num_samples) and self._due(self.cfg.sample_every, step, final)

    def sample(self, model) -> list[str] | None:
        """`num_samples` continuations of the prompt from each process; all of them on the main process."""
        cfg, enc = self.cfg, get_encoding()
        prompt = torch.tensor(encode_prompt(cfg.sample_prompt), dtype=torch.long, device=self.device)
        idx = prompt.unsqueeze(0).repeat(cfg.num_samples, 1)
        generator = torch.Generator(device=self.device).manual_seed(cfg.seed + self.rank)  # fixed per rank
        # eager: compiled blocks would recompile for every length the KV cache grows through
        with self.accelerator.autocast(), torch.compiler.set_stance("force_eager"):
            out = model.generate(idx, cfg.sample_max_new_tokens, top_k=50, generator=generator)
        texts = [f"rank {self.rank} sample {i}: {enc.decode(row.tolist())}" for i, row in enumerate(out)]
        gathered = gather_object(texts)
        return gathered if self.accelerator.is_main_process else None

    def _sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor, reduction="sum")
