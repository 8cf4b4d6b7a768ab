"""Hugging Face interop, the only place that imports `transformers`: conversion to and from
GPT2LMHeadModel (convert.py), tokenizer files, the model card, the export directory and the Hub.
Importing this package imports no transformers; `load_model` does only for Hugging Face sources."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import is_checkpoint_dir, load_model as load_checkpoint_model, resolve_checkpoint
from ..model import GPT
from ..run_dir import RunDir


def load_model(source) -> GPT:
    """Any model the command line accepts: our checkpoint or model directory, a run directory (its
    newest checkpoint), a transformers GPT-2 directory or a Hub id."""
    if is_checkpoint_dir(source) or (isinstance(source, (str, Path)) and RunDir.holds_run(source)):
        return load_checkpoint_model(resolve_checkpoint(source))
    from .convert import gpt_from_hf

    return gpt_from_hf(source)
