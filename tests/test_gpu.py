"""CUDA-only checks of the GPU code paths: bf16 parity, compiled training with evaluation hooks, resume.

Run on a GPU machine with `pytest -m gpu`; on CPU-only machines they are skipped.
"""

import json
from pathlib import Path

import pytest
import torch

from corpus import corpus
from gpt2repro import GPT, GPTConfig
from gpt2repro.checkpoint import list_checkpoints
from gpt2repro.data import TokenLoader, prepare
from gpt2repro.hf.convert import gpt_to_hf
from gpt2repro.presets import load_train_config
from gpt2repro.train import Trainer, train

pytestmark = pytest.mark.gpu

GPU_RUN = ["model.n_layer=2", "model.n_embd=128", "model.n_head=2", "model.block_size=128", "seq_len=128",
           "micro_batch_size=8", "total_batch_size=2048", "warmup_steps=2", "val_batches=4", "num_samples=1",
           "sample_max_new_tokens=8", "mixed_precision=bf16", "compile=true", "seed=3"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return prepare([str(corpus("tinyshakespeare.txt"))], tmp_path_factory.mktemp("data") / "d",
                   val_tokens=8192, shard_size=1_000_000, progress=False)


def test_bf16_logits_match_gpt2lmheadmodel_on_gpu():
    torch.manual_seed(0)
    ours = GPT(GPTConfig(block_size=256, vocab_size=50257, n_layer=4, n_head=4, n_embd=256)).cuda().eval()
    hf = gpt_to_hf(ours).cuda().eval()
    idx = torch.randint(0, 50257, (4, 256), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ours_logits = ours(idx)[0].float()
        hf_logits = hf(idx).logits.float()
    relative = (ours_logits - hf_logits).norm() / hf_logits.norm()
    assert relative < 1e-2  # bf16 operands: expected between 1e-3 and 1e-2


def test_compiled_chunked_loss_matches_the_full_logits_loss_in_one_graph():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256, vocab_size=50304, n_layer=2, n_head=4, n_embd=256)).cuda()
    idx = torch.randint(0, 50257, (8, 256), device="cuda")
    targets = idx.roll(-1, dims=1)

    def loss_and_grads(fn):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(idx, targets)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    def plain(idx, targets):
        logits = model(idx)[0]
        return torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1))[:, :50257].float(), targets.view(-1))

    chunked = torch.compile(lambda idx, targets: model(idx, targets)[1], fullgraph=True)  # no graph break
    loss, grads = loss_and_grads(chunked)
    ref_loss, ref_grads = loss_and_grads(plain)
    assert abs(loss.item() - ref_loss.item()) < 1e-3 * ref_loss.item()
    for ours, ref in zip(grads, ref_grads):
        assert (ours - ref).norm() / ref.norm() < 2e-2  # bf16 operands on both sides


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_chunked_loss_matches_plain_cross_entropy_over_the_real_vocabulary(dtype):
    from gpt2repro.model.loss import linear_cross_entropy

    torch.manual_seed(0)
    x = torch.randn(5000, 128, device="cuda", requires_grad=True)
    w = (0.05 * torch.randn(50304, 128, device="cuda")).requires_grad_()
    targets = torch.randint(0, 50257, (5000,), device="cuda")
    targets[::7] = -1  # ignored rows
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        # 3 full chunks and a partial one; the softmax over the first 50,257 of the 50,304 rows
        loss = linear_cross_entropy(x, w, targets, chunk_rows=1536, classes=50257)
        plain = torch.nn.functional.cross_entropy((x @ w.T)[:, :50257].float(), targets, ignore_index=-1)
        with torch.no_grad():
            no_grad_loss = linear_cross_entropy(x, w, targets, chunk_rows=1536, classes=50257)
    (0.5 * loss).backward()
    grads = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    (0.5 * plain).backward()
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-3  # bf16 logits gradient; fp32 matmuls may run in TF32
    assert abs(loss.item() - plain.item()) < 1e-4 * plain.item()
    assert abs(no_grad_loss.item() - plain.item()) < 1e-4 * plain.item()
    for ours, ref in zip(grads, (x.grad, w.grad)):
        assert ours.dtype == torch.float32 and (ours - ref).norm() / ref.norm() < tol
    assert grads[1][50257:].abs().max() == 0  # the padded rows get no gradient


@pytest.mark.parametrize("compiled", [False, True])
def test_cudnn_flash_attention_matches_sdpa_in_output_and_gradients(compiled):
    from gpt2repro.model import attention

    torch.manual_seed(0)
    qkv = torch.randn(4, 256, 3 * 192, device="cuda", dtype=torch.bfloat16, requires_grad=True)  # 3 heads of 64
    if not attention.fused_supported(qkv, 3):
        pytest.skip("flash-attn-4 is not installed or the GPU is older than Hopper")
    grad_y = torch.randn(4, 256, 192, device="cuda", dtype=torch.bfloat16)
    fn = torch.compile(attention.causal_attention, fullgraph=True) if compiled else attention.causal_attention

    def output_and_grad(fused):
        qkv.grad = None
        y = fn(qkv, 3, fused=fused)
        y.backward(grad_y)
        return y.float(), qkv.grad.float()

    (y, grad), (ref_y, ref_grad) = output_and_grad(True), output_and_grad(False)
    q, k, v = (t.transpose(1, 2).float() for t in attention.split_heads(qkv.detach(), 3))
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(y.shape)
    assert (y - exact).norm() / exact.norm() < 1e-2 and (ref_y - exact).norm() / exact.norm() < 1e-2  # bf16 rounding
    for g, rg in zip(grad.chunk(3, dim=-1), ref_grad.chunk(3, dim=-1)):  # q, k and v gradients
        assert (g - rg).norm() / rg.norm() < 2e-2
    scores = (q @ k.transpose(-1, -2)) / 8.0  # head size 64
    scores = scores.masked_fill(~torch.ones(256, 256, dtype=torch.bool, device="cuda").tril(), float("-inf"))
    lse = attention._attention(qkv.detach(), 3)[1]
    assert lse.shape == (4, 3, 256) and torch.allclose(lse, scores.logsumexp(-1), atol=2e-2)  # natural log, as the backward needs


def test_cudnn_flash_attention_operators_pass_opcheck():
    from gpt2repro.model import attention

    qkv = torch.randn(2, 128, 3 * 192, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    if not attention.fused_supported(qkv, 3):
        pytest.skip("flash-attn-4 is not installed or the GPU is older than Hopper")
    torch.library.opcheck(attention._attention, (qkv, 3))


def _mlp_pair():
    """A plain MLP and a fused one with the same weights (random biases, so their gradients count)."""
    from gpt2repro.model.gpt import MLP

    torch.manual_seed(0)
    config = GPTConfig(n_embd=192, n_head=3)
    plain = MLP(config, fused=False).cuda()
    with torch.no_grad():
        plain.c_fc.bias.normal_(0, 0.02)
        plain.c_proj.bias.normal_(0, 0.02)
    fused = MLP(config, fused=True).cuda()
    fused.load_state_dict(plain.state_dict())
    return plain, fused


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_mlp_with_gelu_in_the_matmul_epilogues_matches_the_plain_mlp_in_output_and_gradients(compiled, residual):
    from gpt2repro.model import fused_mlp

    plain, fused = _mlp_pair()
    x = torch.randn(4, 256, 192, device="cuda", requires_grad=True)
    stream = torch.randn(4, 256, 192, device="cuda", requires_grad=True)  # the block's residual stream
    with torch.autocast("cuda", torch.bfloat16):
        if not fused_mlp.applies(x):
            pytest.skip("quack (the [gpu] extra) is not installed or the GPU is older than Hopper")
    grad_y = torch.randn(4, 256, 192, device="cuda")

    def output_and_grads(module, autocast=True):
        module.zero_grad(set_to_none=True)
        x.grad = stream.grad = None
        with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            run = torch.compile(module) if compiled and autocast else module
            if residual:  # added in c_proj's epilogue by the fused MLP; a bf16 stream, as bf16_residual makes it
                y = run(x, residual=stream.bfloat16() if autocast else stream)
            else:
                y = run(x)
        y.backward(grad_y.to(y.dtype))
        return [y.float(), x.grad] + [p.grad for p in module.parameters()] + ([stream.grad] if residual else [])

    exact = output_and_grads(plain, autocast=False)  # fp32 throughout
    ours, reference = output_and_grads(fused), output_and_grads(plain)
    assert all(t.dtype == torch.float32 for t in ours[1:])  # fp32 gradients for the fp32 master weights
    # output, then the gradients of x, c_fc's and c_proj's weights and biases (and of the stream)
    for a, b, e in zip(ours, reference, exact):
        error, reference_error = ((a - e).norm() / e.norm()).item(), ((b - e).norm() / e.norm()).item()
        assert error < 1e-2 and error < 1.5 * reference_error + 1e-3  # bf16 rounding, no worse than the plain path's


def test_mlp_with_gelu_in_the_matmul_epilogues_passes_opcheck_forward_and_backward():
    from gpt2repro.model import fused_mlp

    x = torch.randn(256, 192, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", torch.bfloat16):
        if not fused_mlp.applies(x):
            pytest.skip("quack (the [gpu] extra) is not installed or the GPU is older than Hopper")
    weights = [torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) / 16
               for shape in ((768, 192), (768,), (192, 768), (192,))]
    torch.library.opcheck(fused_mlp._mlp, (x.requires_grad_(), *weights, None))
    torch.library.opcheck(fused_mlp._mlp, (x, *weights, torch.randn_like(x).requires_grad_()))
    grad_out, h = torch.randn_like(x), torch.randn(256, 768, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(fused_mlp._grad_h, (grad_out, weights[2].detach(), h))


def test_model_with_the_residual_add_in_the_mlps_last_matmul_matches_the_default_model():
    from gpt2repro.model import fused_mlp

    x = torch.zeros(1, 192, device="cuda", requires_grad=True)
    with torch.autocast("cuda", torch.bfloat16):
        if not fused_mlp.applies(x):
            pytest.skip("quack (the [gpu] extra) is not installed or the GPU is older than Hopper")
    config = GPTConfig(block_size=256, n_layer=2, n_head=3, n_embd=192)
    torch.manual_seed(0)
    models = [GPT(config, bf16_residual=True, fused_residual=on).cuda() for on in (False, True)]
    models[1].load_state_dict(models[0].state_dict())
    idx = torch.randint(0, 50257, (4, 256), device="cuda")
    losses = []
    for model in models:
        with torch.autocast("cuda", torch.bfloat16):
            loss = model(idx, idx.roll(-1, dims=1))[1]
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[1] - losses[0]) < 1e-3 * losses[0]  # one rounding of the block's output fewer
    for a, b in zip(models[1].parameters(), models[0].parameters()):
        assert ((a.grad - b.grad).norm() / b.grad.norm()).item() < 2e-2  # bf16 gradients, rounded differently


@pytest.mark.parametrize("compiled", [False, True])
def test_block_with_quacks_layernorm_backward_matches_the_plain_block_in_output_and_gradients(compiled):
    from gpt2repro.model import fused_norm
    from gpt2repro.model.gpt import Block

    x = torch.randn(4, 256, 192, device="cuda", requires_grad=True)
    if not fused_norm.applies(x.detach().bfloat16().requires_grad_()):
        pytest.skip("quack (the [gpu] extra) is not installed or the GPU is older than Hopper")
    torch.manual_seed(0)
    plain = Block(GPTConfig(n_embd=192, n_head=3), 0, fused_norm=False).cuda()
    with torch.no_grad():
        for ln in (plain.ln_1, plain.ln_2):
            ln.weight.normal_(1, 0.2)
            ln.bias.normal_(0, 0.2)
    fused = Block(GPTConfig(n_embd=192, n_head=3), 0, fused_norm=True).cuda()
    fused.load_state_dict(plain.state_dict())
    grad_y = torch.randn(4, 256, 192, device="cuda")

    def output_and_grads(block, autocast=True):
        block.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            stream = x.bfloat16() if autocast else x  # a bf16 residual stream, as bf16_residual makes it
            y = (torch.compile(block) if compiled and autocast else block)(stream)
        y.backward(grad_y.to(y.dtype))
        return [y.float(), x.grad] + [p.grad for p in block.parameters()]

    exact = output_and_grads(plain, autocast=False)  # fp32 throughout
    ours, reference = output_and_grads(fused), output_and_grads(plain)
    assert all(t.dtype == torch.float32 for t in ours[2:])  # fp32 gradients for the fp32 master weights
    for a, b, e in zip(ours, reference, exact):  # the output, then the gradients of x and of every parameter
        error, reference_error = ((a - e).norm() / e.norm()).item(), ((b - e).norm() / e.norm()).item()
        assert error < 2e-2 and error < 1.5 * reference_error + 1e-3  # bf16 rounding, no worse than the plain path's


def test_quacks_layernorm_backward_passes_opcheck():
    from gpt2repro.model import fused_norm

    x, grad_out, grad_stream = torch.randn(3, 256, 192, device="cuda", dtype=torch.bfloat16).unbind(0)
    if not fused_norm.applies(x.detach().requires_grad_()):
        pytest.skip("quack (the [gpu] extra) is not installed or the GPU is older than Hopper")
    mean, rstd = x.float().mean(1), x.float().var(1, correction=0).add(1e-5).rsqrt()
    weight = torch.randn(192, device="cuda")
    torch.library.opcheck(fused_norm._grad, (x, weight, grad_out, mean, rstd, grad_stream))
    grad_x, partials = fused_norm._grad(x, weight, grad_out, mean, rstd, grad_stream)
    xhat = (x.float() - mean[:, None]) * rstd[:, None]
    g = grad_out.float() * weight
    expected = rstd[:, None] * (g - g.mean(1, keepdim=True) - xhat * (g * xhat).mean(1, keepdim=True))
    torch.testing.assert_close(grad_x.float(), expected + grad_stream.float(), rtol=2e-2, atol=2e-2)  # bf16 output
    column_sums = torch.stack([(grad_out.float() * xhat).sum(0), grad_out.float().sum(0)])  # weight, bias
    torch.testing.assert_close(partials.sum(1), column_sums, rtol=1e-4, atol=1e-3)


def test_precompile_compiles_the_backward_kernels_a_larger_batch_then_uses():
    from gpt2repro.model import attention

    qkv = torch.randn(3, 512, 3 * 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)  # 2 heads of 128
    if not attention.fused_supported(qkv, 2):
        pytest.skip("flash-attn-4 is not installed or the GPU is older than Hopper")
    from flash_attn.cute import interface

    caches = [interface._flash_attn_bwd.compile_cache, interface._bwd_preprocess.compile_cache,
              interface._bwd_postprocess_convert.compile_cache]
    before = [len(c.cache) for c in caches]
    assert attention.precompile(qkv.device, n_head=2, n_embd=256, seq_len=512).result() is None
    compiled = [len(c.cache) for c in caches]
    assert sum(compiled) > sum(before)  # head size 128 is new to this process
    attention.causal_attention(qkv, 2).sum().backward()
    assert [len(c.cache) for c in caches] == compiled and torch.isfinite(qkv.grad).all()


def test_compiled_chunked_loss_holds_one_chunk_of_logits_at_a_time():
    from gpt2repro.model.loss import linear_cross_entropy

    rows, chunk, vocab = 32768, 4096, 50304
    x = torch.randn(rows, 256, device="cuda", requires_grad=True)
    w = (0.05 * torch.randn(vocab, 256, device="cuda")).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), device="cuda")
    loss_fn = torch.compile(lambda x, w, t: linear_cross_entropy(x, w, t, chunk_rows=chunk))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss_fn(x, w, targets).backward()  # compile
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss_fn(x, w, targets)
    extra = torch.cuda.max_memory_allocated() - before
    one_chunk = chunk * vocab * 2
    all_logits = rows * vocab * 2
    gradients = x.numel() * 4 + w.numel() * 4 * 2  # fp32 grad_x and grad_w, with room for the bf16 input copies
    assert extra < 1.5 * one_chunk + gradients + 2**26, (extra, all_logits)


def test_loader_batches_are_pinned_for_non_blocking_copies(data_dir):
    x, y = TokenLoader(data_dir, "train", 4, 64).next_batch()
    assert x.is_pinned() and y.is_pinned() and x.dtype == torch.int64


def test_optimizer_is_fused_adamw_on_gpu():
    trainer = Trainer(load_train_config("tiny", None, GPU_RUN), data_dir=None, run_dir=None)
    assert trainer.optimizer.optimizer.defaults["fused"] is True
    assert trainer.accelerator.mixed_precision == "bf16"


def test_compiled_bf16_training_with_validation_hellaswag_samples_and_exact_resume(data_dir, tmp_path):
    hellaswag = tmp_path / "hellaswag.jsonl"
    rows = [{"ctx": f"The cat number {i} sat on the", "endings": ["mat.", "moon and then", "sky", "table"], "label": i % 4}
            for i in range(12)]
    hellaswag.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = GPU_RUN + ["max_steps=6", "val_every=3", "sample_every=3", "hellaswag_every=3",
                          f"hellaswag={hellaswag}", "checkpoint_every=2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(load_train_config("tiny", None, settings), data_dir, straight)
    train(load_train_config("tiny", None, settings + ["stop_after_steps=3"]), data_dir, resumed)
    train(load_train_config("tiny", None, settings), data_dir, resumed)

    def records(run):
        return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]

    a, b = records(straight), records(resumed)
    losses_a = {r["step"]: r["train_loss"] for r in a if "train_loss" in r}
    losses_b = {r["step"]: r["train_loss"] for r in b if "train_loss" in r}
    assert list(losses_a) == list(range(6))
    for step in losses_a:  # not bitwise: some CUDA backward kernels (embedding, attention) accumulate atomically
        assert losses_b[step] == pytest.approx(losses_a[step], rel=1e-4)
    assert [r["step"] for r in a if "val_loss" in r] == [0, 3, 6]  # 6: after the last update
    assert [r["hellaswag_n"] for r in a if "hellaswag_n" in r] == [12, 12, 12]
    assert all(r["mfu"] is None or 0 < r["mfu"] < 1 for r in a if "train_loss" in r)
    assert "Hello, I'm a language model," in (straight / "samples.txt").read_text()
    assert sorted(list_checkpoints(straight / "checkpoints")) == [2, 4, 6]


def test_the_step_replayed_as_a_cuda_graph_matches_the_eager_step_with_accumulation_and_after_a_state_load():
    settings = GPU_RUN  # 2 micro-batches of 8 x 128 per step
    generator = torch.Generator().manual_seed(0)

    def batches(n):
        tokens = torch.randint(0, 50257, (n, 2, 8, 129), generator=generator)
        return [[(t[:, :-1], t[:, 1:]) for t in step] for step in tokens]

    first, second, other = batches(5), batches(3), batches(4)

    def trainer(graph: bool) -> Trainer:
        return Trainer(load_train_config("tiny", None, settings + [f"cuda_graph={str(graph).lower()}"]), None, None)

    def run(trainer, steps) -> list[float]:
        losses = []
        for step in steps:
            losses.append(trainer.take_step(step).loss.item())
            trainer.step += 1
        return losses

    eager, graphed = trainer(False), trainer(True)
    assert eager.graph is None and graphed.graph is not None
    losses = run(eager, first)
    assert run(graphed, first) == pytest.approx(losses, rel=1e-4)  # atomics in some backward kernels: not bitwise
    assert graphed.graph.graph is not None  # the last steps were replays
    # a state from another run: the graph must be captured again around the new optimizer tensors
    donor = trainer(False)
    run(donor, other)
    state = donor.state_dict()  # holds the donor's own tensors: each trainer loads copies
    for t in (eager, graphed):
        t.load_state_dict(torch.utils._pytree.tree_map(lambda v: v.clone() if torch.is_tensor(v) else v, state))
    assert graphed.graph.graph is None
    assert run(graphed, second) == pytest.approx(run(eager, second), rel=1e-4)
    assert graphed.graph.graph is not None
    for key in ("lr", "capturable"):  # as checkpoints save them: a float, and False (a CPU resume refuses True)
        assert graphed.optimizer.param_groups[0][key] == eager.optimizer.param_groups[0][key], key
