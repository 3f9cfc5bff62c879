"""`kolora merge RUN --out DIR`: a standalone model that stock transformers loads (see `kolora.merging`)."""

from __future__ import annotations

from .merging import merge

HELP = "merge the adapter into a standalone model"


def add_arguments(p) -> None:
    p.add_argument("run")
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="replace a merged model kolora wrote in --out (never other files)")


def run(args) -> int:
    merge(args.run, args.out, args.force)
    return 0
