"""HellaSwag, completion style: scoring, the names of its scores and the reference models' scores.

Everything here takes a function from token ids to logits, so the same code scores our GPT, a
compiled or wrapped one, and any Hugging Face causal LM. Several processes pass their rank, world
size and an all-reduce; nothing here knows about Accelerate.

Each of an example's 4 endings is appended to its context (the context's tokens, then the tokens
of " " + ending) and scored by the model's summed cross-entropy on the ending's tokens alone.
Three rules pick an ending:

- `acc`: the smallest summed loss (the most probable continuation);
- `acc_norm_tokens`: the smallest loss per token of the ending, as the GPT-2 reproduction (and the
  GPT-3 paper's "per-token likelihood") does. OpenAI's GPT-2 124M scores acc 0.2859 and
  acc_norm_tokens 0.2955 this way on the 10,042 validation examples;
- `acc_norm`: the smallest loss per character of the ending (without its leading space), which is
  lm-eval's `acc_norm` and the Open LLM Leaderboard's. Scored on the same text, it equals what
  lm-eval reports (tests/test_evaluation.py checks this). lm-eval's own `hellaswag` task also
  rewrites the text first (activity label + ctx_a + capitalised ctx_b, WikiHow's bracketed
  artifacts removed), so its published numbers are for slightly different contexts than the
  official `ctx` field scored here.

The data (download, cache, parsing) is hellaswag_data.py's.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..config import EOT_TOKEN, GPT2_VOCAB_SIZE
from ..errors import UserError
from ..tokenizer import get_encoding
from .device import autocast, reduce_sum
from .hellaswag_data import HellaSwagExample


# The scores evaluate_hellaswag reports, in order; accuracies are None without labelled examples.
HELLASWAG_KEYS = ("hellaswag_acc", "hellaswag_acc_norm_tokens", "hellaswag_acc_norm", "hellaswag_n")

# Completion-style HellaSwag validation scores of reference models, for tables and plots, under the
# key of the rule that produced them. Both are token-normalised: GPT-2 124M's as scored by the GPT-2
# reproduction, GPT-3 Small's zero-shot score from the GPT-3 paper, which compares "per-token
# likelihood". No lm-eval (character-normalised) reference is listed: none is published with the
# installed lm-eval to cite.
REFERENCE_SCORES = {
    "GPT-2 124M": {"hellaswag_acc": 0.2859, "hellaswag_acc_norm_tokens": 0.2955},
    "GPT-3 Small (124M)": {"hellaswag_acc_norm_tokens": 0.337},
}


def upgrade_hellaswag_record(record: dict) -> dict:
    """A log record in today's names. Records written before acc_norm_tokens existed hold the
    token-normalised score under "hellaswag_acc_norm"; it moves to "hellaswag_acc_norm_tokens"
    (and no character-normalised score is claimed for them)."""
    if "hellaswag_acc_norm" in record and "hellaswag_acc_norm_tokens" not in record:
        record = dict(record)
        record["hellaswag_acc_norm_tokens"] = record.pop("hellaswag_acc_norm")
    return record


# ---------------------------------------------------------------------------------------------
# HellaSwag scoring


def ending_chars(example: HellaSwagExample) -> list[int]:
    """Length in characters (code points) of each ending, without the space put before it: what
    lm-eval's acc_norm divides the log-likelihood by."""
    return [len(ending) for ending in example.endings]


def _encode(example: HellaSwagExample) -> list[tuple[list[int], int]]:
    """(context + ending tokens, number of ending tokens) for each of the 4 endings."""
    enc = get_encoding()
    context = enc.encode_ordinary(example.ctx) or [EOT_TOKEN]  # the first ending token needs something before it
    endings = [enc.encode_ordinary(" " + ending) for ending in example.endings]
    return [(context + ending, len(ending)) for ending in endings]


def _fit(example: HellaSwagExample, rows, width: int):
    """Drop the oldest context tokens of rows longer than width; the ending itself must fit."""
    for j, (tokens, ending_length) in enumerate(rows):
        if ending_length >= width:
            raise UserError(f"HellaSwag example {example.index}: ending {j} has {ending_length} tokens, too long for width {width}")
    return [(tokens[-width:], ending_length) for tokens, ending_length in rows]


def _batch_tensors(encoded, labels, rows_per_batch: int, width: int):
    """Right-padded (R, width) tokens, an ending mask and (R/4,) labels; empty rows pad the batch to full size."""
    tokens = torch.full((rows_per_batch, width), EOT_TOKEN, dtype=torch.long)
    mask = torch.zeros((rows_per_batch, width), dtype=torch.bool)
    label_tensor = torch.full((rows_per_batch // 4,), -1, dtype=torch.long)  # -1: no label, or padding
    for e, (rows, label) in enumerate(zip(encoded, labels)):
        label_tensor[e] = -1 if label is None else label
        for j, (row, ending_length) in enumerate(rows):
            r = 4 * e + j
            tokens[r, : len(row)] = torch.tensor(row)
            mask[r, len(row) - ending_length : len(row)] = True
    return tokens, mask, label_tensor


def _ending_losses(logits_fn, tokens, mask, autocast_dtype):
    """Summed cross-entropy over each row's ending tokens and their count, both (R,)."""
    with autocast(tokens.device, autocast_dtype):
        logits = logits_fn(tokens)  # (R, T, V)
    predicts_ending = mask[:, 1:]  # logits at position t predict token t + 1
    # only GPT-2's real tokens: a vocabulary padded for speed must not change the softmax
    selected = logits[:, :-1][predicts_ending][:, :GPT2_VOCAB_SIZE].float()  # (N, 50257)
    losses = torch.zeros(predicts_ending.shape, dtype=torch.float32, device=tokens.device)
    losses[predicts_ending] = F.cross_entropy(selected, tokens[:, 1:][predicts_ending], reduction="none")
    return losses.sum(1), predicts_ending.sum(1)


@torch.no_grad()
def evaluate_hellaswag(
    logits_fn,
    examples: list[HellaSwagExample],
    device="cpu",
    *,
    batch_size: int = 16,
    rank: int = 0,
    world_size: int = 1,
    all_reduce=None,
    autocast_dtype: torch.dtype | None = None,
    pad_to: int | None = None,
    progress: bool = False,
    return_predictions: bool = False,
) -> dict:
    """Completion-style HellaSwag accuracy of `logits_fn`, a map from (B, T) token ids to (B, T, V) logits.

    `batch_size` examples (4 rows each) go through one forward. Every forward has the same shape,
    (4 * batch_size, width) with width = the longest example, at most `pad_to` (pass the model's
    context length; longer examples lose their oldest context tokens), and every rank runs the same
    number of forwards, so a compiled model compiles once and sharded models stay in step.
    Rank r scores examples r, r + world_size, ...; `all_reduce` sums a tensor over ranks (in place or
    returned), called once.

    Returns the global HELLASWAG_KEYS: "hellaswag_acc" (smallest summed loss),
    "hellaswag_acc_norm_tokens" (smallest loss per token), "hellaswag_acc_norm" (smallest loss per
    character, lm-eval's acc_norm), "hellaswag_n" (accuracies are None when no example has a label)
    and, with return_predictions, this rank's "predictions": one dict per example with index, label,
    pred, pred_norm_tokens, pred_norm (the three rules' choices), sum_losses, num_tokens, num_chars.
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
    if not examples:
        raise UserError("no HellaSwag examples to evaluate")
    device = torch.device(device)
    encoded = [_encode(ex) for ex in examples]
    longest = max(len(tokens) for rows in encoded for tokens, _ in rows)
    width = min(longest, pad_to) if pad_to else longest
    mine, mine_encoded = examples[rank::world_size], encoded[rank::world_size]
    num_batches = math.ceil(math.ceil(len(examples) / world_size) / batch_size)

    chars = torch.tensor([ending_chars(ex) for ex in mine], dtype=torch.float32, device=device).view(-1, 4)
    sums, counts, labels = [], [], []
    for b in tqdm(range(num_batches), desc="HellaSwag", disable=not progress):
        chunk = slice(b * batch_size, (b + 1) * batch_size)
        rows = [_fit(ex, encoded_rows, width) for ex, encoded_rows in zip(mine[chunk], mine_encoded[chunk])]
        tokens, mask, label = _batch_tensors(rows, [ex.label for ex in mine[chunk]], 4 * batch_size, width)
        sum_loss, count = _ending_losses(logits_fn, tokens.to(device), mask.to(device), autocast_dtype)
        sums.append(sum_loss.view(-1, 4)[: len(rows)])
        counts.append(count.view(-1, 4)[: len(rows)])
        labels.append(label[: len(rows)].to(device))

    sum_losses, num_tokens, label = torch.cat(sums), torch.cat(counts), torch.cat(labels)  # (E, 4), (E, 4), (E,)
    pred = sum_losses.argmin(1)
    pred_norm_tokens = (sum_losses / num_tokens.clamp(min=1)).argmin(1)
    pred_norm = (sum_losses / chars.clamp(min=1)).argmin(1)  # lm-eval: argmax(loglikelihood / len(ending))
    labelled = label >= 0
    totals = torch.stack([labelled.sum()] + [(labelled & (p == label)).sum() for p in (pred, pred_norm_tokens, pred_norm)])
    n, correct, correct_norm_tokens, correct_norm = reduce_sum(totals, all_reduce).tolist()
    result = {
        "hellaswag_acc": correct / n if n else None,
        "hellaswag_acc_norm_tokens": correct_norm_tokens / n if n else None,
        "hellaswag_acc_norm": correct_norm / n if n else None,
        "hellaswag_n": n,
    }
    if return_predictions:
        result["predictions"] = [
            {"index": ex.index, "label": ex.label, "pred": p, "pred_norm_tokens": pt, "pred_norm": pc,
             "sum_losses": s, "num_tokens": t, "num_chars": ending_chars(ex)}
            for ex, p, pt, pc, s, t in zip(mine, pred.tolist(), pred_norm_tokens.tolist(), pred_norm.tolist(),
                                           sum_losses.tolist(), num_tokens.tolist())
        ]
    return result
