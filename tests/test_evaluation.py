import hashlib
import http.server
import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from gpt2repro import GPT, GPTConfig
from gpt2repro.eval import hellaswag as evaluation
from gpt2repro.eval import hellaswag_data
from gpt2repro.__main__ import main
from gpt2repro.errors import UserError
from gpt2repro.eval.hellaswag import HELLASWAG_KEYS, evaluate_hellaswag
from gpt2repro.eval.hellaswag_data import hellaswag_metric_path, load_hellaswag, read_hellaswag
from gpt2repro.eval.validation import validation_loss
from gpt2repro.hf.export import save_hf
from helpers import write_model_dir

WORDS = (
    "the a man woman dog ball kitchen garden slowly quickly then walks runs throws picks up down over "
    "table knife bread water river bicycle guitar plays café naïve smiles camera begins finishes"
).split()


def cli(*args, env_updates=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env_updates or {})}
    return subprocess.run([sys.executable, "-m", "gpt2repro", *args], capture_output=True, text=True, env=env, timeout=300)


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def write_hellaswag(path: Path, n: int = 11, seed: int = 0, labelled: bool = True) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            row = {"ind": i, "ctx": sentence(rng, 3, 14).capitalize() + ",", "endings": [sentence(rng, 1, 9) + "." for _ in range(4)]}
            if labelled:
                row["label"] = rng.randrange(4)
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # vocab padded to 50,304 like a training run: scoring must crop it to GPT-2's 50,257 tokens
    return GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)).eval()


@pytest.fixture(scope="module")
def export_dir(model, tmp_path_factory):
    return save_hf(model, tmp_path_factory.mktemp("export") / "tiny-gpt2")


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    return read_hellaswag(write_hellaswag(tmp_path_factory.mktemp("hs") / "hellaswag_val.jsonl"))


def ours(model):
    return lambda idx: model(idx)[0]


def unbatched_reference(export_dir, examples):
    """Each ending scored alone by transformers' GPT2LMHeadModel with the exported tokenizer."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(export_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    sums, counts = [], []
    with torch.no_grad():
        for ex in examples:
            context = tokenizer(ex.ctx)["input_ids"]
            row_sums, row_counts = [], []
            for ending in ex.endings:
                ending_ids = tokenizer(" " + ending)["input_ids"]
                ids = torch.tensor([context + ending_ids])
                logprobs = F.log_softmax(hf(ids).logits[0, :-1].double(), dim=-1)
                targets = ids[0, 1:]
                token_logprobs = logprobs[torch.arange(len(targets)), targets][-len(ending_ids):]
                row_sums.append(-token_logprobs.sum().item())
                row_counts.append(len(ending_ids))
            sums.append(row_sums)
            counts.append(row_counts)
    return torch.tensor(sums, dtype=torch.float64), torch.tensor(counts)


def test_hellaswag_equals_an_unbatched_gpt2lmheadmodel_computation_on_the_export(model, export_dir, examples):
    result = evaluate_hellaswag(ours(model), examples, batch_size=4, return_predictions=True)
    sums, counts = unbatched_reference(export_dir, examples)
    chars = torch.tensor([[len(ending) for ending in ex.endings] for ex in examples])  # no leading space, as lm-eval
    predictions = result["predictions"]
    assert list(result) == [*HELLASWAG_KEYS, "predictions"]
    assert [p["index"] for p in predictions] == list(range(len(examples)))
    assert [p["num_tokens"] for p in predictions] == counts.tolist()
    assert [p["num_chars"] for p in predictions] == chars.tolist()
    torch.testing.assert_close(torch.tensor([p["sum_losses"] for p in predictions], dtype=torch.float64), sums, atol=1e-4, rtol=0)
    expected_pred = sums.argmin(1).tolist()
    expected_pred_norm_tokens = (sums / counts).argmin(1).tolist()
    expected_pred_norm = (sums / chars).argmin(1).tolist()
    assert [p["pred"] for p in predictions] == expected_pred
    assert [p["pred_norm_tokens"] for p in predictions] == expected_pred_norm_tokens
    assert [p["pred_norm"] for p in predictions] == expected_pred_norm
    labels = [ex.label for ex in examples]
    assert result["hellaswag_n"] == len(examples)
    assert result["hellaswag_acc"] == sum(p == y for p, y in zip(expected_pred, labels)) / len(examples)
    assert result["hellaswag_acc_norm_tokens"] == sum(p == y for p, y in zip(expected_pred_norm_tokens, labels)) / len(examples)
    assert result["hellaswag_acc_norm"] == sum(p == y for p, y in zip(expected_pred_norm, labels)) / len(examples)
    # the synthetic set is only a meaningful check if the rules disagree somewhere
    assert expected_pred != expected_pred_norm_tokens and expected_pred_norm != expected_pred_norm_tokens


def test_batched_and_one_example_per_forward_scoring_agree(model, examples):
    batched = evaluate_hellaswag(ours(model), examples, batch_size=5, return_predictions=True)
    single = evaluate_hellaswag(ours(model), examples, batch_size=1, return_predictions=True)
    for a, b in zip(batched["predictions"], single["predictions"]):
        keys = ("pred", "pred_norm_tokens", "pred_norm", "num_tokens", "num_chars")
        assert [a[k] for k in keys] == [b[k] for k in keys]
        torch.testing.assert_close(torch.tensor(a["sum_losses"]), torch.tensor(b["sum_losses"]), atol=1e-4, rtol=0)
    assert {k: batched[k] for k in HELLASWAG_KEYS} == {k: single[k] for k in HELLASWAG_KEYS}


def test_checkpoint_and_its_hf_export_score_identically_through_any_logits_function(model, export_dir, examples):
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(export_dir).eval()
    a = evaluate_hellaswag(ours(model), examples, batch_size=4, return_predictions=True)
    b = evaluate_hellaswag(lambda idx: hf(idx).logits, examples, batch_size=4, return_predictions=True)
    for key in ("pred", "pred_norm_tokens", "pred_norm"):
        assert [p[key] for p in a["predictions"]] == [p[key] for p in b["predictions"]]
    assert {k: a[k] for k in HELLASWAG_KEYS} == {k: b[k] for k in HELLASWAG_KEYS}


def test_every_forward_has_the_same_padded_shape_so_a_compiled_model_compiles_once(model, examples):
    shapes = []

    def recording(idx):
        shapes.append(tuple(idx.shape))
        return model(idx)[0]

    evaluate_hellaswag(recording, examples, batch_size=4)  # 11 examples: 4 + 4 + 3 padded to 4
    assert len(shapes) == 3 and len(set(shapes)) == 1 and shapes[0][0] == 16
    shapes.clear()
    evaluate_hellaswag(recording, examples, batch_size=4, rank=1, world_size=2)  # 5 examples, still 2 full batches
    assert shapes == [(16, shapes[0][1])] * 2


def test_examples_longer_than_pad_to_lose_old_context_but_keep_their_ending(model, examples):
    longest = max(len(evaluation._encode(ex)[j][0]) for ex in examples for j in range(4))
    shapes = []

    def recording(idx):
        shapes.append(tuple(idx.shape))
        return model(idx)[0]

    result = evaluate_hellaswag(recording, examples, batch_size=4, pad_to=longest - 5, return_predictions=True)
    assert {s[1] for s in shapes} == {longest - 5}
    full = evaluate_hellaswag(ours(model), examples, batch_size=4, return_predictions=True)
    assert [p["num_tokens"] for p in result["predictions"]] == [p["num_tokens"] for p in full["predictions"]]


def run_ranks_in_threads(world_size, score):
    """Each rank in its own thread; all_reduce sums the ranks' tensors like a collective would."""
    barrier = threading.Barrier(world_size)
    deposited = [None] * world_size
    results = [None] * world_size

    def rank_main(rank):
        def all_reduce(tensor):
            deposited[rank] = tensor.clone()
            barrier.wait()
            total = sum(deposited)
            barrier.wait()
            tensor.copy_(total)  # in place, as torch.distributed.all_reduce does

        results[rank] = score(rank, world_size, all_reduce)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_two_ranks_give_the_same_totals_and_predictions_as_one(model, examples):
    one = evaluate_hellaswag(ours(model), examples, batch_size=2, return_predictions=True)
    two = run_ranks_in_threads(2, lambda rank, world, reduce: evaluate_hellaswag(
        ours(model), examples, batch_size=2, rank=rank, world_size=world, all_reduce=reduce, return_predictions=True))
    assert all({k: r[k] for k in HELLASWAG_KEYS} == {k: one[k] for k in HELLASWAG_KEYS} for r in two)
    merged = sorted((p for r in two for p in r["predictions"]), key=lambda p: p["index"])
    assert [(p["index"], p["pred"], p["pred_norm_tokens"], p["pred_norm"]) for p in merged] == [
        (p["index"], p["pred"], p["pred_norm_tokens"], p["pred_norm"]) for p in one["predictions"]
    ]


def _gloo_rank(rank, world_size, port, state_path, data_path, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    model = GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)).eval()
    model.load_state_dict(torch.load(state_path))
    result = evaluate_hellaswag(
        ours(model), read_hellaswag(data_path), batch_size=2, rank=rank, world_size=world_size, all_reduce=dist.all_reduce
    )
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_give_the_same_totals_as_one(model, examples, tmp_path):
    import socket

    import torch.multiprocessing as mp

    data_path = write_hellaswag(tmp_path / "hs.jsonl")
    torch.save(model.state_dict(), tmp_path / "state.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gloo_rank, args=(2, port, str(tmp_path / "state.pt"), str(data_path), str(tmp_path)), nprocs=2)
    one = evaluate_hellaswag(ours(model), examples, batch_size=2)
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == one


def test_unlabelled_test_split_examples_are_scored_but_not_counted(model, tmp_path):
    examples = read_hellaswag(write_hellaswag(tmp_path / "test.jsonl", n=5, labelled=False))
    assert all(ex.label is None for ex in examples)
    result = evaluate_hellaswag(ours(model), examples, batch_size=2, return_predictions=True)
    assert result["hellaswag_n"] == 0 and all(result[k] is None for k in HELLASWAG_KEYS[:3])
    assert len(result["predictions"]) == 5 and all(p["pred"] in range(4) for p in result["predictions"])


def test_evaluate_module_loads_offline_and_reports_the_same_accuracies(model, examples, monkeypatch):
    import evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    metric = evaluate.load(str(hellaswag_metric_path()))
    assert "Zellers" in metric.citation and "HellaSwag" in metric.description
    result = evaluate_hellaswag(ours(model), examples, batch_size=4, return_predictions=True)
    predictions = result["predictions"]
    scores = metric.compute(
        predictions=[p["sum_losses"] for p in predictions],
        ending_tokens=[p["num_tokens"] for p in predictions],
        ending_chars=[p["num_chars"] for p in predictions],
        references=[p["label"] for p in predictions],
    )
    assert scores == {"acc": result["hellaswag_acc"], "acc_norm_tokens": result["hellaswag_acc_norm_tokens"],
                      "acc_norm": result["hellaswag_acc_norm"], "n": len(examples)}
    assert scores["acc_norm"] != scores["acc_norm_tokens"]  # the two normalisations tell apart on this set


LM_EVAL_TASK = """\
# HellaSwag as lm-eval's own hellaswag.yaml scores it (multiple_choice: acc, acc_norm), but reading
# a local jsonl with our fields and without lm-eval's text preprocessing
task: gpt2repro_hellaswag_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
  cache_dir: {cache}
output_type: multiple_choice
validation_split: validation
doc_to_text: ctx
doc_to_choice: endings
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def test_acc_norm_equals_lm_evals_simple_evaluate_on_the_same_local_file(model, export_dir, tmp_path, monkeypatch):
    """lm-eval's acc_norm divides each ending's log-likelihood by its length in characters; ours must
    give the very same accuracies, example by example, on the export of the same weights (offline:
    the datasets json builder reads the local file)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = write_hellaswag(tmp_path / "hellaswag_local.jsonl", n=24, seed=7)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "gpt2repro_hellaswag_local.yaml").write_text(
        LM_EVAL_TASK.format(data=json.dumps(str(data)), cache=json.dumps(str(tmp_path / "datasets_cache"))))
    lm = HFLM(pretrained=str(export_dir), device="cpu", batch_size=8)
    out = lm_eval.simple_evaluate(
        model=lm, tasks=["gpt2repro_hellaswag_local"], log_samples=True, bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False),
    )
    theirs = out["results"]["gpt2repro_hellaswag_local"]
    examples = read_hellaswag(data)
    mine = evaluate_hellaswag(ours(model), examples, batch_size=8, return_predictions=True)
    assert theirs["sample_len"] == mine["hellaswag_n"] == 24
    assert theirs["acc,none"] == mine["hellaswag_acc"]
    assert theirs["acc_norm,none"] == mine["hellaswag_acc_norm"]
    samples = sorted(out["samples"]["gpt2repro_hellaswag_local"], key=lambda s: s["doc_id"])
    predictions = mine["predictions"]
    assert [s["acc"] for s in samples] == [float(p["pred"] == p["label"]) for p in predictions]
    assert [s["acc_norm"] for s in samples] == [float(p["pred_norm"] == p["label"]) for p in predictions]
    loglikelihoods = torch.tensor([[ll for ll, _ in s["filtered_resps"]] for s in samples], dtype=torch.float64)
    torch.testing.assert_close(loglikelihoods, -torch.tensor([p["sum_losses"] for p in predictions], dtype=torch.float64),
                               atol=1e-4, rtol=0)
    # a check that can fail: per token, some examples are decided differently
    assert any(p["pred_norm"] != p["pred_norm_tokens"] for p in predictions)


def test_lm_eval_hflm_on_the_export_gives_our_log_likelihoods(model, export_dir, examples):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(export_dir), device="cpu", batch_size=4)
    chosen = examples[:3]
    requests = [
        Instance(request_type="loglikelihood", doc={}, arguments=(ex.ctx, " " + ending), idx=i)
        for ex in chosen for i, ending in enumerate(ex.endings)
    ]
    theirs = torch.tensor([logprob for logprob, _ in lm.loglikelihood(requests)], dtype=torch.float64)
    predictions = evaluate_hellaswag(ours(model), chosen, batch_size=3, return_predictions=True)["predictions"]
    mine = -torch.tensor([p["sum_losses"] for p in predictions], dtype=torch.float64).flatten()
    torch.testing.assert_close(theirs, mine, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# HellaSwag data: local files, the download cache, bad input


def test_malformed_jsonl_line_is_reported_with_its_line_number(tmp_path):
    path = write_hellaswag(tmp_path / "hs.jsonl", n=3)
    lines = path.read_text().splitlines()
    lines.insert(2, '{"ctx": "A man", "endings": ["a", "b"')
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"hs\.jsonl:3: not valid JSON"):
        read_hellaswag(path)


@pytest.mark.parametrize("endings, got", [(["a", "b", "c"], "a list of 3"), (["a", "b", "c", "d", "e"], "a list of 5"),
                                          ("abcd", "str"), (["a", "b", "c", 4], "a list of 4")])
def test_an_ending_list_that_is_not_four_strings_is_refused_in_one_line(tmp_path, endings, got):
    path = write_hellaswag(tmp_path / "hs.jsonl", n=2)
    with open(path, "a") as f:
        f.write(json.dumps({"ctx": "A man", "endings": endings, "label": 0}) + "\n")
    with pytest.raises(UserError, match=rf"hs\.jsonl:3: 'endings' must be a list of 4 strings, got {got}$") as err:
        read_hellaswag(path)
    assert "\n" not in str(err.value)


def test_cli_eval_bad_hellaswag_file_fails_with_one_line_naming_the_line(export_dir, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"ctx": "x", "endings": ["a", "b", "c", "d"], "label": 1}) + "\n{oops\n")
    result = cli("eval", "--model", str(export_dir), "--hellaswag", str(path))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "bad.jsonl:2" in result.stderr


def test_cli_eval_model_dir_that_is_neither_checkpoint_nor_gpt2_fails_with_one_line(examples, tmp_path):
    data = write_hellaswag(tmp_path / "hs.jsonl", n=2)
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    for model_dir in (not_a_model, tmp_path / "empty"):
        model_dir.mkdir(exist_ok=True)
        result = cli("eval", "--model", str(model_dir), "--hellaswag", str(data))
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and str(model_dir) in result.stderr


def test_hellaswag_auto_offline_fails_fast_with_one_line_naming_the_cache_path(export_dir, tmp_path):
    result = cli("eval", "--model", str(export_dir), "--hellaswag", "auto", env_updates={"GPT2REPRO_CACHE": str(tmp_path)})
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert str(tmp_path / "hellaswag" / "hellaswag_val.jsonl") in result.stderr and "HF_HUB_OFFLINE" in result.stderr


def test_hellaswag_auto_offline_is_refused_before_any_model_is_loaded(tmp_path, monkeypatch, capsys):
    import gpt2repro.hf

    def load_model(source):
        raise AssertionError("the model was loaded before the HellaSwag data was checked")

    monkeypatch.setattr(gpt2repro.hf, "load_model", load_model)
    monkeypatch.setenv("GPT2REPRO_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["eval", "--model", "gpt2", "--hellaswag", "auto", "--split", "train"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(tmp_path / "hellaswag" / "hellaswag_train.jsonl") in err
    assert not (tmp_path / "hellaswag").exists() or not list((tmp_path / "hellaswag").iterdir())


@pytest.fixture
def hellaswag_server(tmp_path, monkeypatch):
    """A loopback HTTP server standing in for the HellaSwag repository."""
    served = tmp_path / "served"
    served.mkdir()
    write_hellaswag(served / "hellaswag_val.jsonl", n=4)
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(served), **k)  # noqa: E731
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(hellaswag_data, "HELLASWAG_URL", f"http://127.0.0.1:{server.server_port}/hellaswag_{{name}}.jsonl")
    yield served
    server.shutdown()
    server.server_close()


def test_auto_download_caches_the_file_records_its_sha256_and_reuses_it(hellaswag_server, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    examples = load_hellaswag("auto", cache_dir=cache)
    cached = cache / "hellaswag_val.jsonl"
    assert len(examples) == 4 and cached.read_bytes() == (hellaswag_server / "hellaswag_val.jsonl").read_bytes()
    assert (cache / "hellaswag_val.jsonl.sha256").read_text().split()[0] == hashlib.sha256(cached.read_bytes()).hexdigest()
    assert not list(cache.glob("*.part"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a second use needs no network
    assert load_hellaswag("auto", cache_dir=cache) == examples
    cached.write_text(cached.read_text().replace("a", "b", 1))
    with pytest.raises(UserError, match="does not match its recorded sha256"):
        load_hellaswag("auto", cache_dir=cache)


def test_auto_download_serves_the_train_and_unlabelled_test_splits_too(hellaswag_server, tmp_path):
    write_hellaswag(hellaswag_server / "hellaswag_train.jsonl", n=6, seed=1)
    write_hellaswag(hellaswag_server / "hellaswag_test.jsonl", n=3, seed=2, labelled=False)
    cache = tmp_path / "cache"
    train = load_hellaswag("auto", split="train", cache_dir=cache)
    test = load_hellaswag("auto", split="test", cache_dir=cache)
    assert len(train) == 6 and all(ex.label is not None for ex in train)
    assert len(test) == 3 and all(ex.label is None for ex in test)
    assert {p.name for p in cache.iterdir()} == {
        "hellaswag_train.jsonl", "hellaswag_train.jsonl.sha256", "hellaswag_test.jsonl", "hellaswag_test.jsonl.sha256",
    }


def test_unreachable_download_fails_in_one_line_naming_the_cache_path(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(hellaswag_data, "HELLASWAG_URL", "http://127.0.0.1:9/hellaswag_{name}.jsonl")  # discard port: refused
    with pytest.raises(UserError) as error:
        load_hellaswag("auto", cache_dir=tmp_path)
    assert "\n" not in str(error.value) and str(tmp_path / "hellaswag_val.jsonl") in str(error.value)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# validation loss and the eval command


def test_validation_loss_is_the_mean_over_all_windows_of_all_ranks(model):
    torch.manual_seed(3)
    windows = torch.randint(0, 50257, (7, 17))
    x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
    with torch.no_grad():
        per_window = [model(x[i : i + 1], y[i : i + 1])[1].item() for i in range(7)]
    batches = [(x[0:3], y[0:3]), (x[3:5], y[3:5]), (x[5:6], y[5:6]), (x[6:7], y[6:7])]
    loss_fn = lambda a, b: model(a, b)[1]  # noqa: E731
    one = validation_loss(loss_fn, batches)
    assert one == pytest.approx(sum(per_window) / 7, abs=1e-5)
    # rank 0 gets batches 0 and 2 (4 windows), rank 1 batches 1 and 3 (3 windows)
    two = run_ranks_in_threads(2, lambda rank, world, reduce: validation_loss(loss_fn, batches[rank::world], all_reduce=reduce))
    assert two[0] == two[1] == pytest.approx(one, abs=1e-6)


def test_cli_eval_json_is_one_line_and_checkpoint_and_export_agree(model, export_dir, tmp_path, capsys):
    checkpoint = tmp_path / "ckpt"
    write_model_dir(model, checkpoint)
    data = write_hellaswag(tmp_path / "hs.jsonl", n=6)
    outputs = []
    for source in (checkpoint, export_dir):
        assert main(["eval", "--model", str(source), "--hellaswag", str(data), "--batch-size", "4", "--json"]) == 0
        out = capsys.readouterr().out
        assert len(out.strip().splitlines()) == 1
        outputs.append(json.loads(out))
    assert outputs[0] == outputs[1]
    assert list(outputs[0]) == list(HELLASWAG_KEYS) and outputs[0]["hellaswag_n"] == 6


def test_cli_eval_scores_a_plain_gpt2lmheadmodel_directory_like_transformers_does(examples, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(4)
    # transformers' defaults (dropout 0.1), saved by transformers alone: no tokenizer files, no card
    hf = GPT2LMHeadModel(GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()
    hf.save_pretrained(tmp_path / "plain")
    data = write_hellaswag(tmp_path / "hs.jsonl")
    assert main(["eval", "--model", str(tmp_path / "plain"), "--hellaswag", str(data), "--batch-size", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    with torch.no_grad():
        expected = evaluate_hellaswag(lambda idx: hf(idx).logits, examples, batch_size=3)
    assert result == expected and result["hellaswag_n"] == len(examples)


def test_cli_eval_table_shows_our_scores_beside_the_reference_models(export_dir, tmp_path, capsys):
    data = write_hellaswag(tmp_path / "hs.jsonl", n=4)
    assert main(["eval", "--model", str(export_dir), "--hellaswag", str(data)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("hellaswag_")}
    assert list(rows) == list(HELLASWAG_KEYS)
    # the published scores are token-normalised: they stand beside acc_norm_tokens, not lm-eval's acc_norm
    assert rows["hellaswag_acc_norm_tokens"].endswith("GPT-2 124M 0.2955, GPT-3 Small (124M) 0.3370")
    assert rows["hellaswag_acc"].endswith("GPT-2 124M 0.2859")
    assert "GPT" not in rows["hellaswag_acc_norm"] and "GPT" not in rows["hellaswag_n"]


def test_cli_eval_data_reports_the_mean_loss_of_the_data_modules_validation_windows(model, export_dir, monkeypatch, capsys):

    torch.manual_seed(5)
    windows = torch.randint(0, 50257, (6, 65))
    calls = []

    def validation_batches(data_dir, batch_size, seq_len, num_batches, rank=0, world_size=1, vocab_size=None):
        calls.append((data_dir, batch_size, seq_len, num_batches, rank, world_size, vocab_size))
        starts = range(0, batch_size * num_batches, batch_size)
        return [(windows[i : i + batch_size, :-1].contiguous(), windows[i : i + batch_size, 1:].contiguous()) for i in starts]

    # the data module's own loader is tested with it; here only what eval asks of it and does with it
    import gpt2repro.eval.command

    monkeypatch.setattr(gpt2repro.eval.command, "validation_batches", validation_batches)
    assert main(["eval", "--model", str(export_dir), "--data", "DATA", "--val-batches", "3", "--val-batch-size", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert calls == [("DATA", 2, 64, 3, 0, 1, 50257)]  # full context windows; the export's vocabulary
    with torch.no_grad():  # the export is our model with the padded vocabulary cropped
        logits = model(windows[:, :-1])[0][..., :50257]
        expected = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()
    assert result["val_loss"] == pytest.approx(expected, abs=1e-5)
    assert result["val_perplexity"] == pytest.approx(torch.tensor(expected).exp().item(), rel=1e-5)


def test_cli_eval_of_a_hub_id_keeps_the_download_path_and_fails_offline_in_one_line(tmp_path):
    data = write_hellaswag(tmp_path / "hs.jsonl", n=2)
    result = cli("eval", "--model", "gpt2", "--hellaswag", str(data), env_updates={"HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "cannot download 'gpt2' from the Hugging Face Hub (HF_HUB_OFFLINE is set)" in result.stderr


def test_a_rank_without_validation_batches_keeps_its_totals_on_its_device_and_makes_the_same_forwards(model):
    windows = torch.randint(0, 50257, (2, 33), generator=torch.Generator().manual_seed(3))
    batch = (windows[:, :-1], windows[:, 1:])
    seen, calls = [], []

    def all_reduce(tensor):  # records where the totals are, as NCCL needs them on the rank's GPU
        seen.append(tensor.device)
        return torch.tensor([7.0, 2.0], dtype=torch.float64)

    def loss_fn(x, y):
        calls.append(x.shape)
        return model(x, y)[1]

    blank = torch.zeros(2, 32, dtype=torch.long)
    # 1 validation batch over 2 ranks: rank 1 has none, and must still make rank 0's one forward
    loss = validation_loss(loss_fn, [], all_reduce=all_reduce, device=torch.device("meta"), forwards=1,
                           blank=(blank, blank))
    assert seen == [torch.device("meta")] and calls == [blank.shape] and loss == 3.5
    calls.clear()
    validation_loss(loss_fn, [batch], forwards=1, blank=(blank, blank))
    assert calls == [batch[0].shape]  # a rank with its share makes no blank forward
