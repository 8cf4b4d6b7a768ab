"""Evaluation: validation loss, HellaSwag, the `eval` and `sample` commands. Model-agnostic: each
function takes a function from tokens to logits or loss, or a GPT, never a Trainer."""
