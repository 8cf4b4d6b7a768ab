import logging

import pytest
import torch
import torch.nn.functional as F

from gpt2repro import GPT, GPTConfig
from gpt2repro.config import MODEL_PRESETS
from gpt2repro.errors import UserError
from gpt2repro.model.loss import linear_cross_entropy
from gpt2repro.train import build_optimizer, decay_groups

TINY = GPTConfig(block_size=32, vocab_size=50304, n_layer=2, n_head=2, n_embd=16)


def test_gpt2_124m_parameter_counts_match_the_paper_model():
    with torch.device("meta"):
        assert GPT(MODEL_PRESETS["gpt2"]).num_params() == 124_475_904
        assert GPT(GPTConfig(vocab_size=50257)).num_params() == 124_439_808


def test_output_head_is_tied_to_token_embedding_after_to_and_state_dict_load():
    model = GPT(TINY)
    model = model.to(torch.float64)
    assert model.lm_head.weight is model.transformer.wte.weight
    other = GPT(TINY).to(torch.float64)
    other.load_state_dict(model.state_dict())
    assert other.lm_head.weight is other.transformer.wte.weight
    torch.testing.assert_close(other.lm_head.weight, model.transformer.wte.weight, rtol=0, atol=0)
    other.load_weights({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"})
    assert other.lm_head.weight is other.transformer.wte.weight


def test_residual_projections_are_initialised_with_depth_scaled_std():
    torch.manual_seed(0)
    config = GPTConfig(block_size=32, vocab_size=50304, n_layer=8, n_head=4, n_embd=256)
    model = GPT(config)
    expected = 0.02 * (2 * config.n_layer) ** -0.5
    for block in model.transformer.h:
        assert abs(block.attn.c_proj.weight.std().item() - expected) < 0.1 * expected
        assert abs(block.mlp.c_proj.weight.std().item() - expected) < 0.1 * expected
        assert abs(block.mlp.c_fc.weight.std().item() - 0.02) < 0.002
        assert torch.count_nonzero(block.attn.c_attn.bias) == 0


def test_training_forward_returns_loss_without_logits():
    model = GPT(TINY)
    idx = torch.randint(0, 50257, (2, 8))
    logits, loss = model(idx, idx)
    assert logits is None and loss.ndim == 0
    logits, loss_again = model(idx, idx, return_logits=True)
    assert logits.shape == (2, 8, TINY.vocab_size)
    torch.testing.assert_close(loss, loss_again)


@pytest.mark.parametrize("chunk_rows", [1, 7, 10, 64])
def test_chunked_loss_equals_plain_cross_entropy_in_value_and_gradients(chunk_rows):
    torch.manual_seed(chunk_rows)
    x = torch.randn(37, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    targets[[3, 20, 36]] = -1  # ignored rows count neither in the loss nor in its mean
    scale = 0.37  # as gradient accumulation scales the loss before backward

    loss = linear_cross_entropy(x, w, targets, chunk_rows=chunk_rows)
    (scale * loss).backward()
    grads = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    plain = F.cross_entropy(x @ w.T, targets, ignore_index=-1)
    (scale * plain).backward()

    torch.testing.assert_close(loss, plain, rtol=1e-12, atol=0)
    torch.testing.assert_close(grads[0], x.grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(grads[1], w.grad, rtol=1e-10, atol=1e-14)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(x, w, targets, chunk_rows=chunk_rows), plain, rtol=1e-12, atol=0)


def test_chunked_loss_under_bf16_autocast_matches_the_plain_path_and_keeps_fp32_gradients():
    torch.manual_seed(0)
    x = torch.randn(96, 32, requires_grad=True)
    w = (0.1 * torch.randn(300, 32)).requires_grad_()
    targets = torch.randint(0, 300, (96,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(x, w, targets, chunk_rows=40)
        plain = F.cross_entropy((x @ w.T).float(), targets)  # the matmul in bf16, the softmax in fp32
    loss.backward()
    grads = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    plain.backward()
    assert loss.dtype == torch.float32 and grads[0].dtype == grads[1].dtype == torch.float32
    assert abs(loss.item() - plain.item()) < 1e-5 * plain.item()
    for ours, ref in zip(grads, (x.grad, w.grad)):
        assert (ours - ref).norm() / ref.norm() < 1e-2  # bf16 rounding of the logits gradient


def test_model_training_loss_and_gradients_equal_those_through_full_logits():
    torch.manual_seed(0)
    model = GPT(TINY).to(torch.float64)
    idx = torch.randint(0, 50257, (3, 11))
    targets = idx.roll(-1, dims=1)
    targets[:, -1] = -1
    _, loss = model(idx, targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits, _ = model(idx)
    # the softmax spans GPT-2's 50,257 tokens only, as the exported model's does
    plain = F.cross_entropy(logits.view(-1, logits.size(-1))[:, :50257], targets.view(-1), ignore_index=-1)
    plain.backward()
    torch.testing.assert_close(loss, plain, rtol=1e-12, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-9, atol=1e-13, msg=name)
    assert grads["transformer.wte.weight"][50257:].abs().max() == 0  # the padded rows (tied: embedding and output) get nothing
    assert grads["transformer.wte.weight"][:50257].abs().max() > 0
    unchunked = GPT(TINY, loss_chunk_rows=0).to(torch.float64)
    unchunked.load_state_dict(model.state_dict())
    torch.testing.assert_close(unchunked(idx, targets)[1].double(), plain, rtol=1e-6, atol=0)  # same softmax, in fp32


def test_bf16_residual_rounds_the_stream_to_bf16_under_bf16_autocast_and_changes_nothing_else():
    torch.manual_seed(0)
    ref = GPT(TINY)
    model = GPT(TINY, bf16_residual=True)
    model.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 50257, (2, 16))
    targets = idx.roll(-1, dims=1)
    streams = []
    model.transformer.h[1].register_forward_pre_hook(lambda module, args: streams.append(args[0].dtype))

    def loss_and_grads(m):
        m.zero_grad()
        loss = m(idx, targets)[1]
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    # without autocast (CPU training, fp32 everywhere) the option is a no-op, bit for bit
    (loss, grads), (ref_loss, ref_grads) = loss_and_grads(model), loss_and_grads(ref)
    assert streams == [torch.float32] and torch.equal(loss, ref_loss)
    assert all(torch.equal(grads[n], ref_grads[n]) for n in grads)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (loss, grads), (ref_loss, ref_grads) = loss_and_grads(model), loss_and_grads(ref)
    assert streams[-1] == torch.bfloat16
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads.values())
    # the stream and its gradient lose fp32's mantissa: bf16 keeps 8 bits, about 0.4% per rounding
    assert abs(loss - ref_loss) < 1e-3 * ref_loss
    for name, grad in ref_grads.items():
        assert (grads[name] - grad).norm() <= 2e-2 * grad.norm(), name


def test_compiled_training_loss_is_one_graph_with_the_eager_loss_and_gradients():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=320, n_layer=1, n_head=2, n_embd=16))
    idx = torch.randint(0, 320, (2, 16))
    targets = idx.roll(-1, dims=1)
    compiled = torch.compile(lambda idx, targets: model(idx, targets)[1], fullgraph=True)  # no graph break

    def loss_and_grads(fn):
        model.zero_grad()
        loss = fn(idx, targets)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss, grads = loss_and_grads(compiled)
    ref_loss, ref_grads = loss_and_grads(lambda idx, targets: model(idx, targets)[1])
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for ours, ref in zip(grads, ref_grads):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)


def test_kv_cached_generation_matches_full_recomputation():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    idx = torch.randint(0, 50257, (3, 5))
    out = model.generate(idx, 40, top_k=1)  # greedy, and long enough to slide past block_size
    # greedy decoding by re-running the whole (cropped) context every step
    ref = idx
    for _ in range(40):
        logits, _ = model(ref[:, -TINY.block_size:])
        logits = logits[:, -1, :50257]
        ref = torch.cat([ref, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ref)


def test_generation_with_a_fixed_generator_is_reproducible_and_never_samples_padding():
    model = GPT(TINY)
    idx = torch.zeros((2, 1), dtype=torch.long)
    a = model.generate(idx, 20, top_k=None, generator=torch.Generator().manual_seed(7))
    b = model.generate(idx, 20, top_k=None, generator=torch.Generator().manual_seed(7))
    c = model.generate(idx, 20, top_k=None, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.max()) < 50257


def test_decay_groups_decay_exactly_the_two_dimensional_tensors(caplog):
    model = GPT(TINY)
    decay, no_decay = decay_groups(model.named_parameters())
    assert set(decay) == {"transformer.wte.weight", "transformer.wpe.weight"} | {
        f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert all(name.endswith(("bias", "ln_1.weight", "ln_2.weight", "ln_f.weight")) for name in no_decay)
    assert len(no_decay) == 2 * 8 + 2  # per block: 4 linear biases + 2 LayerNorms x (weight, bias); ln_f
    with caplog.at_level(logging.INFO, logger="gpt2repro"):
        optimizer, names = build_optimizer(model.named_parameters(), weight_decay=0.1, lr=1e-3)
    assert names == decay + no_decay  # the optimizer's parameter order, which checkpoints key its state by
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["eps"] == 1e-8
    assert not optimizer.defaults["fused"]  # the fused kernel is CUDA-only
    # wte 50304*16 + wpe 32*16 + 2 blocks * (16*48 + 16*16 + 16*64 + 64*16); 2 * (48+16+64+16 + 2*32) + 32
    assert 811_520 + 448 == model.num_params()
    assert "10 decayed tensors (811,520 parameters), 18 non-decayed tensors (448 parameters)" in caplog.text


def test_loading_weights_of_another_shape_names_the_mismatch():
    state = GPT(TINY).state_dict()
    wider = GPT(GPTConfig(block_size=32, vocab_size=50304, n_layer=2, n_head=2, n_embd=32))
    with pytest.raises(UserError, match=r"weight has shape \(\d+, 16\), expected \(\d+, 32\)") as err:
        wider.load_weights(state, source="test weights")
    assert "\n" not in str(err.value)
    deeper = GPT(GPTConfig(block_size=32, vocab_size=50304, n_layer=3, n_head=2, n_embd=16))
    with pytest.raises(UserError, match="missing transformer.h.2"):
        deeper.load_weights(state)


def test_quack_kernels_leave_the_plain_path_bit_for_bit_where_they_do_not_apply():
    from gpt2repro.model import fused_mlp, fused_norm

    torch.manual_seed(0)
    plain = GPT(TINY, fused_mlp=False, fused_norm=False)
    fused = GPT(TINY, fused_mlp=True, fused_norm=True, fused_residual=True)
    fused.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 50257, (2, 16))
    bf16 = torch.zeros(2, 16, dtype=torch.bfloat16, requires_grad=True)
    for autocast in (False, True):  # CPU fp32, and CPU bf16 autocast
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            losses = [m(idx, idx.roll(-1, dims=1))[1] for m in (plain, fused)]
            assert not fused_mlp.applies(bf16) and not fused_norm.applies(bf16)
        for loss in losses:
            loss.backward()
        assert torch.equal(*losses)
        assert all(torch.equal(a.grad, b.grad) for a, b in zip(plain.parameters(), fused.parameters()))
        plain.zero_grad()
        fused.zero_grad()
    assert fused_mlp.backend(torch.device("cpu"), "bf16") == "separate matmul and GELU kernels"
    assert fused_norm.backend(torch.device("cpu"), "bf16") == "compiled from PyTorch's"


def _layer_norm_backward(x, weight, dout, rstd, dx, dw_partial, db_partial, dresidual_out, dresidual, *, mean,
                         is_layernorm):
    """quack's LayerNorm backward's contract, written in PyTorch: dx = dresidual_out + the input gradient, and
    the weight and bias gradients as partial sums over consecutive row blocks."""
    assert is_layernorm and dresidual is None
    xhat = (x.float() - mean[:, None]) * rstd[:, None]
    g = dout.float() * weight.float()
    grad = rstd[:, None] * (g - g.mean(1, keepdim=True) - xhat * (g * xhat).mean(1, keepdim=True))
    dx.copy_(grad + dresidual_out.float())
    for p, rows in enumerate(torch.arange(x.size(0)).tensor_split(dw_partial.size(0))):
        dw_partial[p] = (dout.float() * xhat)[rows].sum(0)
        db_partial[p] = dout.float()[rows].sum(0)


@pytest.fixture
def reference_layer_norm_kernel(monkeypatch):
    """fused_norm on CPU, with quack's kernel replaced by its contract written in PyTorch (3 partial-sum rows)."""
    from gpt2repro.model import fused_norm

    monkeypatch.setattr(fused_norm, "_kernels", lambda: (_layer_norm_backward, lambda C, device: 3))


@pytest.mark.parametrize("compiled", [False, True])
def test_layer_norm_fork_sends_the_stream_and_layernorm_gradients_through_one_backward(monkeypatch, compiled,
                                                                                      reference_layer_norm_kernel):
    from gpt2repro.model import gpt  # the fused path's plumbing on CPU

    monkeypatch.setattr(gpt, "fused_norm_applies", lambda x: True)
    torch.manual_seed(0)
    plain, fused = gpt.Block(TINY, 0, fused_norm=False), gpt.Block(TINY, 0, fused_norm=True)
    with torch.no_grad():
        for ln in (plain.ln_1, plain.ln_2):
            ln.weight.normal_(1, 0.5)
            ln.bias.normal_(0, 0.5)
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(2, 16, 16, requires_grad=True)
    grad_y = torch.randn(2, 16, 16)

    def output_and_grads(block):
        x.grad = None
        y = (torch.compile(block, backend="aot_eager", fullgraph=True) if compiled else block)(x)
        y.backward(grad_y)
        return [y, x.grad] + [p.grad for p in block.parameters()]

    ours, reference = output_and_grads(fused), output_and_grads(plain)
    assert torch.equal(ours[0], reference[0])  # the same forward
    for a, b in zip(ours[1:], reference[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # fp32, summed in another order


@pytest.mark.parametrize("checkpointing", [False, True])
def test_model_with_layer_norm_forks_matches_the_plain_model(monkeypatch, checkpointing, reference_layer_norm_kernel):
    from gpt2repro.model import gpt

    monkeypatch.setattr(gpt, "fused_norm_applies", lambda x: torch.is_grad_enabled())
    torch.manual_seed(0)
    plain = GPT(TINY, fused_norm=False, activation_checkpointing=checkpointing)
    fused = GPT(TINY, fused_norm=True, activation_checkpointing=checkpointing)
    fused.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 50257, (2, 16))
    losses = [m(idx, idx.roll(-1, dims=1))[1] for m in (plain, fused)]
    for loss in losses:
        loss.backward()
    assert torch.equal(*losses)
    for a, b in zip(plain.parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6)


def test_layer_norm_backward_operator_passes_opcheck(reference_layer_norm_kernel):
    from gpt2repro.model import fused_norm

    x, grad_out, grad_stream = torch.randn(3, 10, 16).unbind(0)
    mean, rstd = x.mean(1), x.var(1, correction=0).add(1e-5).rsqrt()
    torch.library.opcheck(fused_norm._grad, (x, torch.randn(16), grad_out, mean, rstd, grad_stream))
