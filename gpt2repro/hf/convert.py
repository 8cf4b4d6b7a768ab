"""GPT <-> transformers' GPT2LMHeadModel, and GPT2LMHeadModel from a directory or the Hub.

Our module names equal Hugging Face's; the differences are that HF's Conv1D stores weights as
(in, out) where nn.Linear stores (out, in), that HF's vocabulary is GPT-2's 50,257 where ours may
be padded to 50,304, and that HF keeps no separate lm_head.weight in its files (it is tied).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from .. import io
from ..config import EOT_TOKEN, GPTConfig
from ..errors import UserError, first_line
from ..model import GPT

# weights stored transposed by HF's Conv1D
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def config_from_hf(hf_config) -> GPTConfig:
    """Read a `transformers.GPT2Config`, refusing any variant our module does not implement."""
    problems = []
    if getattr(hf_config, "model_type", None) != "gpt2":
        problems.append(f"model_type is {getattr(hf_config, 'model_type', None)!r}, not 'gpt2'")
    else:
        if hf_config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            problems.append(f"activation_function {hf_config.activation_function!r} is not tanh GELU")
        if hf_config.n_inner not in (None, 4 * hf_config.n_embd):
            problems.append(f"n_inner {hf_config.n_inner} is not 4 * n_embd")
        if not hf_config.scale_attn_weights or hf_config.scale_attn_by_inverse_layer_idx:
            problems.append("attention scaling differs from GPT-2's 1/sqrt(head_dim)")
        if abs(hf_config.layer_norm_epsilon - 1e-5) > 1e-12:
            problems.append(f"layer_norm_epsilon {hf_config.layer_norm_epsilon} is not 1e-5")
        if getattr(hf_config, "add_cross_attention", False):
            problems.append("it has cross-attention")
        if not getattr(hf_config, "tie_word_embeddings", True):
            problems.append("its output head is not tied to the token embedding")
    if problems:
        raise UserError("not a GPT-2 config: " + "; ".join(problems))
    return GPTConfig(
        block_size=hf_config.n_positions,
        vocab_size=hf_config.vocab_size,
        n_layer=hf_config.n_layer,
        n_head=hf_config.n_head,
        n_embd=hf_config.n_embd,
    )

def config_to_hf(config: GPTConfig) -> GPT2Config:
    """The equivalent `transformers.GPT2Config`, with the vocabulary cropped to GPT-2's 50,257."""
    return GPT2Config(
        vocab_size=config.real_vocab_size,
        n_positions=config.block_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        bos_token_id=EOT_TOKEN,
        eos_token_id=EOT_TOKEN,
        tie_word_embeddings=True,
        architectures=["GPT2LMHeadModel"],
    )


def load_hf_model(source) -> GPT2LMHeadModel:
    """A GPT2LMHeadModel from an instance, a local directory or a Hub id, with one-line errors."""
    if isinstance(source, GPT2LMHeadModel):
        return source
    if hasattr(source, "config") and hasattr(source, "state_dict"):
        config_from_hf(source.config)  # raises the one-line "not a GPT-2 config" error
        return source
    from transformers import AutoConfig

    source = str(source)
    local = Path(source).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise UserError(f"{local} is not a Hugging Face model directory (no config.json)")
    elif not io.is_hub_id(source):
        raise UserError(f"{source} is neither a local directory nor a Hugging Face Hub model id")
    try:
        hf_config = AutoConfig.from_pretrained(source)
    except Exception as e:  # OSError, ValueError, or a config validation error, depending on the cause
        raise _load_error(source, local, e) from None
    try:
        config_from_hf(hf_config)
    except UserError as e:
        raise UserError(f"{source} is {e}") from None  # "PATH is not a GPT-2 config: ..."
    if local.exists() and not any(local.glob("*.safetensors")):
        raise UserError(f"{local} has no .safetensors weights; gpt2repro loads no pickle-based files "
                        "(pytorch_model.bin): convert them to safetensors first")
    try:
        # safetensors only: pickle-based weights (pytorch_model.bin) could run code when loaded
        return GPT2LMHeadModel.from_pretrained(source, dtype=torch.float32, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise _load_error(source, local, e) from None


def _load_error(source: str, local: Path, error: Exception) -> UserError:
    if local.exists():
        return UserError(f"cannot load {local} as a GPT-2 model: {first_line(error, with_type=False)}")
    offline = io.offline()
    if not offline and "safetensors" in str(error):
        return UserError(f"{source!r} on the Hugging Face Hub has no safetensors weights; gpt2repro loads no "
                         "pickle-based files (pytorch_model.bin)")
    reason = f"{offline} is set" if offline else "no network or no such repository"
    return UserError(f"cannot download {source!r} from the Hugging Face Hub ({reason}); pass a local model directory instead")


def gpt_from_hf(source) -> GPT:
    hf_model = load_hf_model(source)
    config = config_from_hf(hf_model.config)
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
    hf_config = config_to_hf(model.config)
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
