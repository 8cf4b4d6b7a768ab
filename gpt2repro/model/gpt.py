"""GPT-2 as one readable nn.Module.

Module names are exactly Hugging Face's (`transformer.h.0.attn.c_attn`, `transformer.ln_f`,
`lm_head`), so converting to and from `GPT2LMHeadModel` is a list of transposes (hf.py).
Shapes in comments: B batch, T time, C n_embd, nh heads, hs head size, V vocabulary.

The constructor's keyword arguments choose how the same function is computed (speed and memory
levers), never what it computes: `attention` ("auto": cuDNN + FlashAttention-4 where they apply,
else PyTorch's SDPA; "sdpa": always SDPA), `loss_chunk_rows` (rows of logits alive at once in the
training loss; 0 computes the full logits), `recompute_gelu` (each MLP recomputes its GELU in
backward), `fused_mlp` (the MLP's GELU inside quack's matmul epilogues where they apply, which
also recompute it), `fused_residual` (with `fused_mlp`, the MLP's last matmul also adds the bf16
residual stream), `fused_norm` (each Block's LayerNorm backward in quack's kernel, with the residual
stream's gradient added in, where it applies), `activation_checkpointing` (each Block recomputes its
whole forward in backward) and `bf16_residual` (under bf16 autocast the residual stream is bf16
instead of fp32: the same function, rounded as llm.c rounds it).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from ..config import GPTConfig
from ..errors import UserError
from .attention import causal_attention, split_heads
from .fused_mlp import applies as fused_mlp_applies, gelu_mlp
from .fused_norm import applies as fused_norm_applies, layer_norm_fork
from .loss import CHUNK_ROWS, compute_dtype, linear_cross_entropy

ATTENTION_KINDS = ("auto", "sdpa")


class KVCache:
    """Keys and values of the tokens seen so far, so generation encodes each token once."""

    def __init__(self, config: GPTConfig, batch_size: int, device, dtype):
        shape = (config.n_layer, batch_size, config.n_head, config.block_size, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (B, nh, T, hs) keys/values; return all keys/values so far."""
        end = self.length + k.size(2)
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int, fused: bool = True):
        super().__init__()
        self.n_head = config.n_head
        self.layer = layer
        self.fused = fused  # allow the cuDNN + FlashAttention-4 kernels where they apply
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.is_residual_projection = True

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        qkv = self.c_attn(x)  # (B, T, 3C)
        if kv_cache is None:
            return self.c_proj(causal_attention(qkv, self.n_head, fused=self.fused))
        B, T, C = x.size()
        q, k, v = (t.transpose(1, 2) for t in split_heads(qkv, self.n_head))  # (B, nh, T, hs)
        if kv_cache.length == 0:
            kv_cache.update(self.layer, k, v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k, v = kv_cache.update(self.layer, k, v)  # (B, nh, S, hs), S = cached + T
            # new token i sits at position S - T + i and sees every position up to it
            S = k.size(2)
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig, recompute_gelu: bool = True, fused: bool = True):
        super().__init__()
        self.recompute_gelu = recompute_gelu
        self.fused = fused  # allow the GELU inside quack's matmul epilogues where they apply (fused_mlp.py)
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.act = nn.GELU(approximate="tanh")  # GPT-2's gelu_new
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.is_residual_projection = True

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The MLP of x, plus `residual` where one is given."""
        if self.fused and fused_mlp_applies(x):
            if residual is None or residual.dtype == torch.bfloat16:  # quack's epilogue adds a bf16 stream
                return gelu_mlp(x, self.c_fc, self.c_proj, residual)
            return residual + gelu_mlp(x, self.c_fc, self.c_proj)
        h = self.c_fc(x)
        if self.recompute_gelu and torch.is_grad_enabled() and h.requires_grad:
            # backward recomputes the GELU from h instead of keeping its output: 2 bytes x 4C per token
            # and layer less memory (4.5 GiB at the 124M model's B=64, T=1024) for ~1% more GPU time
            y = self.c_proj(checkpoint(self.act, h, use_reentrant=False))
        else:
            y = self.c_proj(self.act(h))
        return y if residual is None else residual + y


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig, layer: int, fused_attention: bool = True, recompute_gelu: bool = True,
                 fused_mlp: bool = True, fused_norm: bool = True, fused_residual: bool = True):
        super().__init__()
        self.fused_residual = fused_residual  # hand the stream to the MLP, whose last matmul may add it (fused_mlp.py)
        self.fused_norm = fused_norm  # allow quack's LayerNorm backward where it applies (fused_norm.py)
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.attn = CausalSelfAttention(config, layer, fused_attention)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.mlp = MLP(config, recompute_gelu, fused_mlp)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        x, h = self._norm(x, self.ln_1)
        x = x + self.attn(h, kv_cache)
        x, h = self._norm(x, self.ln_2)
        return self.mlp(h, residual=x) if self.fused_residual else x + self.mlp(h)

    def _norm(self, x: torch.Tensor, ln: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, ln(x)); where quack's kernel applies, ln's backward also adds the skip connection's gradient."""
        if self.fused_norm and fused_norm_applies(x):
            return layer_norm_fork(x, ln)
        return x, ln(x)


def _embed(model: "GPT", idx: torch.Tensor, start: int) -> torch.Tensor:
    """The residual stream's start: token plus position embeddings of idx (B, T) from position `start`."""
    pos = torch.arange(start, start + idx.size(1), dtype=torch.long, device=idx.device)  # (T,)
    x = model.transformer.wte(idx) + model.transformer.wpe(pos)  # (B, T, C)
    if model.bf16_residual and compute_dtype(x) == torch.bfloat16:
        x = x.to(torch.bfloat16)  # every block then adds its bf16 outputs to a bf16 stream, as llm.c does
    return x


def _final_loss(model: "GPT", x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the residual stream x (B, T, C) after ln_f against targets (B, T), -1 ignored.
    The softmax spans GPT-2's 50,257 tokens: padded vocabulary rows are never predicted, as in the export."""
    x = model.transformer.ln_f(x)
    return linear_cross_entropy(x.view(-1, x.size(-1)), model.lm_head.weight, targets.reshape(-1), ignore_index=-1,
                                chunk_rows=model.loss_chunk_rows, classes=model.config.real_vocab_size)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, *, attention: str = "auto", loss_chunk_rows: int = CHUNK_ROWS,
                 recompute_gelu: bool = True, activation_checkpointing: bool = False, bf16_residual: bool = False,
                 fused_mlp: bool = True, fused_norm: bool = True, fused_residual: bool = True):
        super().__init__()
        if attention not in ATTENTION_KINDS:
            raise UserError(f"attention must be one of {', '.join(ATTENTION_KINDS)}, got {attention!r}")
        self.config = config
        self.loss_chunk_rows = loss_chunk_rows
        self.activation_checkpointing = activation_checkpointing
        self.bf16_residual = bf16_residual
        self._loss_ends = (_embed, _final_loss)  # compiled graphs of their own after compile_blocks()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
                wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embeddings
                h=nn.ModuleList([Block(config, i, attention == "auto", recompute_gelu and not activation_checkpointing,
                                       fused_mlp, fused_norm, fused_residual) for i in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=1e-5),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied input and output embeddings
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "is_residual_projection", False):
                # two residual additions per block: keep the residual stream's variance from growing with depth
                std *= (2 * self.config.n_layer) ** -0.5
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def compile_blocks(self) -> None:
        """Compile one Block graph that every layer reuses (dynamo treats each layer's weights as inputs,
        so it compiles once for all layers), and the training loss's two ends as graphs of their own:
        the embedding sum, and the final LayerNorm with the loss."""
        for block in self.transformer.h:
            block.compile()
        self._loss_ends = tuple(torch.compile(end, fullgraph=True) for end in (_embed, _final_loss))

    def num_params(self) -> int:
        """Unique parameters (the tied embedding counted once), position embeddings included."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        return_logits: bool | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx (B, T) token ids -> (logits (B, T, V), loss).

        With targets (B, T) the mean cross-entropy is returned and, unless `return_logits=True`,
        no logits: the loss is then computed a chunk of rows at a time and the (B, T, V) logits
        never exist at once. Targets of -1 are ignored.
        """
        B, T = idx.size()
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} exceeds block_size {self.config.block_size}")
        # training and validation: the loss chunk by chunk, never holding the (B*T, V) logits (loss.py)
        loss_only = targets is not None and not return_logits and self.loss_chunk_rows > 0 and kv_cache is None
        embed, final_loss = self._loss_ends if loss_only else (_embed, None)
        x = embed(self, idx, start)  # (B, T, C)
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and kv_cache is None
        for block in self.transformer.h:
            # checkpointing keeps only each Block's input; backward runs the Block's forward again
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x, kv_cache)
        if loss_only:
            return None, final_loss(self, x, targets)
        x = self.transformer.ln_f(x)
        if kv_cache is not None:
            kv_cache.length += T
        logits = self.lm_head(x)  # (B, T, V) in the autocast dtype
        if targets is None:
            return logits, None
        classes = self.config.real_vocab_size
        loss = F.cross_entropy(logits.view(B * T, -1)[:, :classes].float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def load_weights(self, state_dict: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Strict load that names the first mismatch in one line. The tied lm_head.weight may be absent."""
        expected = {k: v.shape for k, v in self.state_dict().items()}
        given = dict(state_dict)
        if "lm_head.weight" not in given and "transformer.wte.weight" in given:
            given["lm_head.weight"] = given["transformer.wte.weight"]
        missing = sorted(expected.keys() - given.keys())
        unexpected = sorted(given.keys() - expected.keys())
        wrong = [k for k in expected.keys() & given.keys() if tuple(given[k].shape) != tuple(expected[k])]
        if missing or unexpected or wrong:
            c = self.config
            shape = f"n_layer={c.n_layer}, n_head={c.n_head}, n_embd={c.n_embd}, vocab_size={c.vocab_size}, block_size={c.block_size}"
            if wrong:
                k = sorted(wrong)[0]
                detail = f"{k} has shape {tuple(given[k].shape)}, expected {tuple(expected[k])}"
            elif missing:
                detail = f"missing {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
            else:
                detail = f"unexpected {unexpected[0]}" + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else "")
            raise UserError(f"{source} does not fit a GPT with {shape}: {detail}")
        with torch.no_grad():
            for name, tensor in self.state_dict().items():
                tensor.copy_(given[name])

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        top_k: int | None = 50,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        on_token=None,
    ) -> torch.Tensor:
        """Sample max_new_tokens after idx (B, T); returns (B, T + max_new_tokens).

        Keys and values are cached, so each new token costs one position. Past block_size the
        context slides and is re-encoded. `on_token(next_ids)` is called with each (B,) step, for
        streaming. Padded vocabulary entries beyond GPT-2's 50,257 tokens are never sampled.
        """
        was_training = self.training
        self.eval()
        block_size = self.config.block_size
        cache = KVCache(self.config, idx.size(0), idx.device, compute_dtype(self.lm_head.weight))
        out = idx
        step_input = idx[:, -block_size:]
        for _ in range(max_new_tokens):
            if cache.length + step_input.size(1) > block_size:
                cache.length = 0  # context slides: positions shift, so re-encode the last block_size tokens
                step_input = out[:, -block_size:]
            logits, _ = self(step_input, kv_cache=cache)
            logits = logits[:, -1, :].float() / max(temperature, 1e-8)  # (B, V)
            logits[:, self.config.real_vocab_size:] = -math.inf  # padded vocabulary entries
            if top_k is not None and top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
                logits = logits.masked_fill(logits < kth, -math.inf)
            probs = F.softmax(logits, dim=-1)
            next_ids = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            out = torch.cat((out, next_ids), dim=1)
            step_input = next_ids
            if on_token is not None:
                on_token(next_ids[:, 0])
        self.train(was_training)
        return out
