"""Command line: `gpt2repro <command>` or `python -m gpt2repro <command>`.

Each command parses its arguments here and hands plain values to the module that owns the work.
Bad input raises UserError, printed as one line on stderr with exit status 2. Training that stops
before max_steps with a checkpoint saved (SIGTERM, stop_after_steps) exits with status 75: rerun to resume.
"""

from __future__ import annotations

import argparse
import sys

from .config import describe_keys
from .errors import UserError
from .presets import TRAIN_PRESETS, describe_presets


def _cmd_prepare(args) -> None:
    from .data import describe_data_dir, prepare, verify_data_dir

    if args.source:
        prepare(args.source, args.out, name=args.name, split=args.split, text_field=args.text_field,
                shard_size=args.shard_size, val_tokens=args.val_tokens, num_workers=args.workers,
                overwrite=args.overwrite)
    elif not args.verify:
        raise UserError("nothing to do: pass --source SRC [SRC ...], or --verify to check an existing --out DIR")
    if args.verify:
        verify_data_dir(args.out)
        print(f"verified the sha256 of every shard in {args.out}")
    print(describe_data_dir(args.out))


def _cmd_train(args) -> int:
    from .presets import load_train_config
    from .train import EXIT_STOPPED_EARLY, train

    cfg = load_train_config(args.preset, args.config, [item for group in args.set for item in group])
    return 0 if train(cfg, args.data, args.out).finished else EXIT_STOPPED_EARLY


def _cmd_bench(args) -> None:
    from .bench import main as bench_main

    bench_main(args)


def _cmd_export(args) -> None:
    from .hf.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out)
    print(f"exported {args.checkpoint} -> {out}")


def _cmd_eval(args) -> None:
    import json

    from .eval.command import evaluate_model, format_results
    from .hf import load_model

    results = evaluate_model(
        lambda: load_model(args.model), hellaswag=args.hellaswag, split=args.split, data_dir=args.data, val_batches=args.val_batches,
        val_batch_size=args.val_batch_size, batch_size=args.batch_size, device=args.device,
        progress=not args.json and sys.stderr.isatty(),
    )
    print(json.dumps(results) if args.json else format_results(results))


def _cmd_sample(args) -> None:
    from .eval.device import inference_device
    from .eval.sample import stream_samples
    from .hf import load_model

    device, autocast_dtype = inference_device(args.device)
    model = load_model(args.model)
    stream_samples(
        model.to(device), args.prompt, num=args.num, max_new_tokens=args.max_new_tokens, top_k=args.top_k,
        seed=args.seed, device=device, autocast_dtype=autocast_dtype,
    )


def _cmd_plot(args) -> None:
    from .plot import plot_run

    print(f"wrote {plot_run(args.run, args.out, log_steps=args.log_steps, compare=args.compare, baselines=args.baseline)}")


def _cmd_push(args) -> None:
    from .hf.hub import push_to_hub

    plan = push_to_hub(args.dir, args.repo_id, private=args.private, revision=args.revision, dry_run=args.dry_run)
    visibility = "private" if plan["private"] else "public"
    verb = "would upload" if args.dry_run else "uploaded"
    print(f"{verb} {len(plan['files'])} files to {visibility} model repo {plan['repo_id']} (revision {plan['revision']}):")
    for name, size in plan["files"]:
        print(f"  {name:<28} {size:>14,} bytes")
    if args.dry_run:
        print("\nmodel card (README.md):\n" + plan["card"])
    else:
        print(plan["url"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt2repro", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", help="tokenise documents into uint16 shards + manifest; rerunning resumes")
    p.add_argument("--source", nargs="+", metavar="SRC",
                   help="Hugging Face dataset id (streamed), or local .txt (one document per file), .jsonl, "
                        ".jsonl.xz, .jsonl.gz or .parquet files, or directories of them")
    p.add_argument("--out", required=True, help="data directory to write (manifest.json, {val,train}_NNNNNN.npy)")
    p.add_argument("--name", help="configuration of a Hub dataset, e.g. sample-10BT")
    p.add_argument("--split", default="train", help="split of a Hub dataset (default train)")
    p.add_argument("--text-field", default="text", help="field holding the text in jsonl/parquet/Hub records (default text)")
    p.add_argument("--shard-size", type=int, default=100_000_000, help="tokens per shard file (default 100,000,000)")
    p.add_argument("--val-tokens", type=int, default=10_000_000, help="tokens taken first for the val split (default 10,000,000)")
    p.add_argument("--workers", type=int, help="tokeniser processes (default: the CPU count)")
    p.add_argument("--overwrite", action="store_true", help="replace a data directory prepared with other settings")
    p.add_argument("--verify", action="store_true", help="afterwards check every shard's sha256 against the manifest")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser(
        "train", help="train (or resume) a run; works under `accelerate launch` on any number of GPUs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"presets (what each sets beside the defaults):\n{describe_presets()}\n\n"
               f"--set keys (every field of TrainConfig, commented in gpt2repro/config.py):\n{describe_keys()}\n\n"
               "exit status: 0 done, 2 bad input (one line on stderr), 75 stopped early with a checkpoint (rerun to resume)")
    p.add_argument("--preset", default="gpt2-124M", help=f"one of {', '.join(TRAIN_PRESETS)} (default gpt2-124M)")
    p.add_argument("--data", required=True, help="prepared data directory (gpt2repro prepare)")
    p.add_argument("--out", required=True, help="run directory; rerunning with the same one resumes")
    p.add_argument("--config", help="YAML file of config overrides, applied after the preset")
    p.add_argument("--set", nargs="+", action="append", default=[], metavar="KEY=VALUE",
                   help="overrides applied last, e.g. --set max_steps=100 model.n_layer=6")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("bench", help="training-step throughput, ours and optionally Hugging Face's, on this GPU")
    p.add_argument("--compare", choices=["hf"], help="also time transformers' GPT2LMHeadModel on the same tokens")
    p.add_argument("--batch", type=int, default=64, help="micro batch size (sequences)")
    p.add_argument("--seq", type=int, default=1024, help="sequence length")
    p.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation)")
    p.add_argument("--model", help="model preset (default: gpt2, the 124M model)")
    p.add_argument("--set", nargs="+", action="append", default=[], metavar="KEY=VALUE",
                   help="training-config overrides, e.g. --set attention=sdpa activation_checkpointing=true")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("export", help="convert a training checkpoint into a Hugging Face model directory")
    p.add_argument("checkpoint", help="checkpoint directory (RUN/checkpoints/step_NNNNNN) or run directory")
    p.add_argument("--out", required=True, help="directory to write (config, safetensors, tokenizer, card)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("eval", help="HellaSwag accuracy and/or validation loss of a model")
    p.add_argument("--model", required=True, help="checkpoint dir, run dir, exported HF dir, or Hub id such as gpt2")
    p.add_argument("--hellaswag", metavar="auto|PATH",
                   help="auto: the official split, downloaded once into $GPT2REPRO_CACHE/hellaswag "
                        "(default ~/.cache/gpt2repro/hellaswag); or a local HellaSwag jsonl")
    p.add_argument("--split", default="validation", choices=["train", "validation", "test"],
                   help="HellaSwag split for --hellaswag auto (default validation)")
    p.add_argument("--data", help="prepared data directory: report validation loss and perplexity on its val split")
    p.add_argument("--val-batches", type=int, default=20, help="validation batches of --val-batch-size windows (default 20)")
    p.add_argument("--val-batch-size", type=int, default=8, help="windows of block_size tokens per batch (default 8)")
    p.add_argument("--batch-size", type=int, default=16, help="HellaSwag examples per forward pass (default 16)")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("sample", help="stream samples from a model to the terminal")
    p.add_argument("--model", required=True, help="checkpoint dir, run dir, exported HF dir, or Hub id such as gpt2")
    p.add_argument("--prompt", default="Hello, I'm a language model,", help="text every sample continues")
    p.add_argument("--num", type=int, default=4, help="number of samples (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per sample (default 32)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens; 0: all (default 50)")
    p.add_argument("--seed", type=int, default=42, help="seed of the sampling generator (default 42)")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("plot", help="plot a run's loss, HellaSwag, learning rate and throughput (or several runs') into a PNG")
    p.add_argument("run", help="run directory (reads RUN/log.jsonl)")
    p.add_argument("--out", help="PNG to write (default RUN/curves.png)")
    p.add_argument("--log-steps", action="store_true", help="logarithmic step axis")
    p.add_argument("--compare", nargs="+", default=[], metavar="RUN", help="more runs to draw on the same axes")
    p.add_argument("--baseline", nargs=2, action="append", default=[], metavar=("LOSS", "LABEL"),
                   help='a horizontal validation-loss line, e.g. --baseline 3.2924 "GPT-2 124M on FineWeb-Edu"; repeatable')
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("push", help="upload an exported model directory to the Hugging Face Hub")
    p.add_argument("dir", help="directory written by gpt2repro export")
    p.add_argument("--repo-id", required=True, help="USER/NAME of the model repository (created if needed)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", help="branch to push to (created if needed; default main)")
    p.add_argument("--dry-run", action="store_true", help="list the files and the model card; upload nothing")
    p.set_defaults(func=_cmd_push)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args.func(args)
    except UserError as e:
        print(f"gpt2repro {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gpt2repro {args.command}: interrupted", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
