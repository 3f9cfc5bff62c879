"""The `kolora` command: it only parses and dispatches. Each verb lives in its own stage module
(`kolora.train`, `kolora.chat`, …), which declares its flags (`add_arguments`) and does the
work (`run`); config flags derive from the typed config (`kolora.config`). Every mistake a
user can make ends as one line — what, where, how to fix — and a non-zero exit, with the
traceback only under `--debug`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import __version__
from .config import suggest_key
from .device import allocator_defaults
from .errors import KoloraError, Stopped

# verb -> stage module, in the order `kolora --help` lists them. A stage module defines HELP,
# add_arguments(parser) and run(args), or VERBS = {verb: (help, add_arguments, run)} for
# several small verbs. It must import without torch/transformers so `kolora --help` stays fast.
STAGES = {"train": "train", "prepare": "prepare", "chat": "chat", "merge": "merge", "models": "info",
          "inspect": "info", "doctor": "info", "eval": "evaluate", "export": "export", "serve": "serve",
          "estimate": "estimate", "retrieve": "retrieve"}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line with a hint, instead of usage + error
        hint = f"see `{self.prog} --help`"
        if "unrecognized arguments" in message:
            bad = message.split(":", 1)[1].split()[0]
            guess = suggest_key(bad) if bad.startswith("--") else None
            if guess:
                hint = f"did you mean --{guess}?"
        raise KoloraError(f"{message} ({self.prog})", hint)


def verb(name: str):
    """(help, add_arguments, run) of a verb."""
    mod = importlib.import_module(f"kolora.{STAGES[name]}")
    verbs = getattr(mod, "VERBS", None)
    return verbs[name] if verbs else (mod.HELP, mod.add_arguments, mod.run)


def build_parser() -> Parser:
    parser = Parser(prog="kolora", description="LoRA / QLoRA fine-tuning of small language models on a laptop CPU — Korean first.")
    parser.add_argument("--version", action="version", version=f"kolora {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in STAGES:
        help_text, add_arguments, _ = verb(name)
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def quiet_libraries() -> None:
    """Library chatter (deprecation notes, per-tensor progress bars) hides kolora's own lines."""
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*kernels.*")
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its optional hub-kernel notice on every import
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    allocator_defaults()  # before anything imports torch
    debug = "--debug" in argv
    if not debug:
        quiet_libraries()
    try:
        args = build_parser().parse_args(argv)
        return dispatch(args)
    except KoloraError as e:
        if debug:
            raise
        print(f"kolora: error: {e.one_line()}", file=sys.stderr)
        return e.exit_code
    except Stopped as e:
        print(f"kolora: stopped: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("kolora: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        if debug:
            raise
        print("kolora: error: out of memory — lower train.batch_size or data.max_length, or use model.quantization 4bit",
              file=sys.stderr)
        return 3
    except Exception as e:  # noqa: BLE001 - never a bare traceback for users
        if debug:
            raise
        print(f"kolora: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              "(run again with --debug for the traceback)", file=sys.stderr)
        return 1


def dispatch(args) -> int:
    if args.command is None:
        build_parser().print_help()
        return 0
    return verb(args.command)[2](args) or 0


if __name__ == "__main__":
    sys.exit(main())
