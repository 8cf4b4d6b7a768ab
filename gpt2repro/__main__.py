"""Command line: `gpt2repro <command>` or `python -m gpt2repro <command>`.

Each command parses its arguments here and hands plain values to the module that owns the work.
Bad input raises UserError, printed as one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from .errors import UserError


def _cmd_export(args) -> None:
    from .export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out)
    print(f"exported {args.checkpoint} -> {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt2repro", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("export", help="convert a training checkpoint into a Hugging Face model directory")
    p.add_argument("checkpoint", help="checkpoint directory (RUN/checkpoints/step_NNNNNN) or run directory")
    p.add_argument("--out", required=True, help="directory to write (config, safetensors, tokenizer, card)")
    p.set_defaults(func=_cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"gpt2repro {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gpt2repro {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
