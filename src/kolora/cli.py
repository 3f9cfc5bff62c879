"""The `kolora` command: one verb per stage. Flags for train/prepare derive from the config dataclasses."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from dataclasses import MISSING, fields

from . import __version__
from .config import SECTIONS, RunConfig, load_yaml, parse_scalar, suggest_key
from .errors import KoloraError, Stopped

ALIASES = {  # short flags for the keys people set most
    "--model": "model.name", "--data": "data.path", "--out": "train.output_dir",
    "--epochs": "train.epochs", "--max-steps": "train.max_steps", "--lr": "train.lr",
    "--max-length": "data.max_length", "--r": "lora.r",
}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line with a hint, instead of usage + error
        hint = f"see `{self.prog} --help`"
        if "unrecognized arguments" in message:
            bad = message.split(":", 1)[1].split()[0]
            guess = suggest_key(bad) if bad.startswith("--") else None
            if guess:
                hint = f"did you mean --{guess}?"
        raise KoloraError(f"{message} ({self.prog})", hint)


def add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML preset (see configs/); flags below override it")
    for alias, key in ALIASES.items():
        p.add_argument(alias, dest=f"cfg:{key}", default=argparse.SUPPRESS, metavar="V", help=f"= --{key}")
    for section, cls in SECTIONS.items():
        group = p.add_argument_group(section)
        for f in fields(cls):
            default = f.default if f.default is not MISSING else f.default_factory()
            group.add_argument(f"--{section}.{f.name}", dest=f"cfg:{section}.{f.name}", default=argparse.SUPPRESS,
                               metavar="V", help=f"{f.metadata.get('help', '')} [default: {default}]".replace("%", "%%"))


def flag_value(key: str, text: str):
    """Text fields stay text ('no', '1.0', a Korean prompt); other fields parse like YAML."""
    section, name = key.split(".", 1)
    kind = {f.name: str(f.type) for f in fields(SECTIONS[section])}[name]
    return text if kind.startswith("str") else parse_scalar(text)


def apply_flags(cfg: RunConfig, args, allowed: tuple[str, ...] | None = None) -> RunConfig:
    for dest, value in vars(args).items():
        if dest.startswith("cfg:"):
            key = dest[4:]
            if allowed is not None and key not in allowed:
                raise KoloraError(f"--{key} cannot change when resuming", f"only {', '.join('--' + k for k in allowed)} can")
            cfg.set(key, flag_value(key, value), source=f"--{key}")
    return cfg


def build_config(args) -> RunConfig:
    return apply_flags(load_yaml(args.config) if getattr(args, "config", None) else RunConfig(), args)


def add_gen_flags(p: argparse.ArgumentParser) -> None:
    from .chat import GenConfig

    d = GenConfig()
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy (deterministic)")
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty)
    p.add_argument("--seed", type=int, default=d.seed, help="sampling seed (with --temperature > 0)")


def gen_config(args):
    from .chat import GenConfig

    return GenConfig(args.max_new_tokens, args.temperature, args.top_p, args.repetition_penalty, args.seed)


def build_parser() -> Parser:
    parser = Parser(prog="kolora", description="LoRA / QLoRA fine-tuning of small language models on a laptop CPU — Korean first.")
    parser.add_argument("--version", action="version", version=f"kolora {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    p = sub.add_parser("train", help="fine-tune a LoRA adapter", description="Fine-tune a LoRA/QLoRA adapter.")
    add_config_flags(p)
    p.add_argument("--resume", metavar="RUN", help="continue the run in RUN from its newest checkpoint")
    p.add_argument("--dry-run", action="store_true", help="check config and data, print the plan, train nothing")
    p.add_argument("--force", action="store_true", help="replace an existing run in the output directory")

    p = sub.add_parser("prepare", help="check a dataset and show its statistics")
    p.add_argument("path", nargs="?", help="data file (default: data.path of the config)")
    add_config_flags(p)

    p = sub.add_parser("chat", help="chat with a trained run")
    p.add_argument("run")
    p.add_argument("--question", "-q", help="answer one question and exit")
    p.add_argument("--quick-test", type=int, metavar="N", nargs="?", const=3, help="answer N test-split questions")
    p.add_argument("--base", action="store_true", help="use the base model (adapter disabled)")
    p.add_argument("--compare", action="store_true", help="with --quick-test: base and tuned answers side by side")
    add_gen_flags(p)

    p = sub.add_parser("merge", help="merge the adapter into a standalone model")
    p.add_argument("run")
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="overwrite --out")

    sub.add_parser("models", help="list model presets and whether they are available")

    p = sub.add_parser("inspect", help="module summary and suggested LoRA targets of a model")
    p.add_argument("model")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--trust-remote-code", action="store_true")

    sub.add_parser("doctor", help="versions, CPU/GPU features, memory")

    # verbs that live in their own module: each defines HELP, add_arguments(parser) and run(args);
    # the module must import without torch/transformers so `kolora --help` stays fast
    for verb, module in VERB_MODULES.items():
        if importlib.util.find_spec(f"kolora.{module}") is None:
            continue
        mod = importlib.import_module(f"kolora.{module}")
        add_arguments = getattr(mod, "add_arguments", None)
        if add_arguments is None:
            continue
        p = sub.add_parser(verb, help=mod.HELP, description=mod.HELP)
        add_arguments(p)
    return parser


VERB_MODULES = {"eval": "evaluate", "export": "export", "serve": "serve", "estimate": "estimate"}


# --------------------------------------------------------------------------- commands
def cmd_prepare(args) -> None:
    import statistics

    from .data import category_table, count_hangul, difficulty_counts, load_splits
    from .models import load_tokenizer, resolve
    from .prompt import IGNORE, encode_example

    cfg = build_config(args)
    if args.path:
        cfg.data.path = args.path
    splits, report = load_splits(cfg)
    for line in report:
        print(line)
    examples = [ex for name in ("train", "validation", "test") for ex in splits[name]]
    print(f"split {cfg.data.split} (seed {cfg.data.seed}, stratified by category):")
    for line in category_table(splits):
        print("  " + line)
    diff = difficulty_counts(examples)
    print("difficulty: " + ", ".join(f"{k} {v}" for k, v in sorted(diff.items())))
    tokenizer = load_tokenizer(resolve(cfg.model.name), cfg.model.trust_remote_code)
    tokenized = [encode_example(tokenizer, ex, cfg.data.system_prompt, cfg.data.template) for ex in examples]
    too_long = [ex.line for ex, (ids, _) in zip(examples, tokenized) if len(ids) > cfg.data.max_length]
    lengths = sorted(len(ids) for ids, _ in tokenized)
    answer_tok = sum(sum(1 for x in labels if x != IGNORE) - 1 for _, labels in tokenized)  # minus the EOS
    hangul = sum(count_hangul(ex.answer) for ex in examples)
    p95 = lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))]
    print(f"tokens per example with {cfg.model.name} (prompt + answer + EOS): p50 {statistics.median(lengths):.0f}, "
          f"p95 {p95}, max {lengths[-1]}")
    print(f"Korean characters per answer token: {hangul / max(answer_tok, 1):.2f}")
    print(f"rows over data.max_length={cfg.data.max_length}: {len(too_long)}"
          + (f" (lines {', '.join(map(str, too_long[:10]))}) — they would be dropped; raise data.max_length to keep them"
             if too_long else ""))


def cmd_models(args) -> None:
    from .models import HUB_SUGGESTIONS, PRESETS, cache_root, hub_cached, preset_status

    print(f"offline presets (cache: {cache_root()}):")
    for name, preset in PRESETS.items():
        print(f"  {name:<14} {preset_status(name):<44} {preset.description}")
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    print("hub models (need the network once, then the local Hugging Face cache):")
    for short, repo in HUB_SUGGESTIONS.items():
        state = "cached" if hub_cached(repo) else ("not cached (offline)" if offline else "not cached (downloads on first use)")
        print(f"  {repo:<36} {state}")
    print("configs: " + ", ".join(sorted(f.name[:-5] for f in _configs_dir().glob("*.yaml"))) if _configs_dir() else "")


def _configs_dir():
    from pathlib import Path

    here = Path(__file__).resolve().parents[2] / "configs"
    return here if here.is_dir() else None


def cmd_doctor(args) -> None:
    import importlib.metadata as md
    import platform

    import torch

    from .models import cache_root
    from .train import cpu_has_bf16

    for pkg in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors", "gguf", "datasets"):
        try:
            version = md.version(pkg)
        except md.PackageNotFoundError:
            version = "not installed"
        print(f"{pkg:<13} {version}")
    print(f"python        {platform.python_version()} ({platform.machine()})")
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    print(f"cpu           {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}, "
          f"ISA {torch.backends.cpu.get_cpu_capability()}")
    print(f"bf16 on cpu   {'yes' if cpu_has_bf16() else 'no'} (avx512_bf16 {'avx512_bf16' in flags}, "
          f"AMX-BF16 {'amx_bf16' in flags})")
    mem_kb = next((int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0) \
        if os.path.exists("/proc/meminfo") else 0
    print(f"RAM           {mem_kb / 2**20:.1f} GiB")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            prop = torch.cuda.get_device_properties(i)
            print(f"cuda:{i}        {prop.name}, {prop.total_memory / 2**30:.1f} GiB, bf16 {torch.cuda.is_bf16_supported()}")
    else:
        print("CUDA          not available (CPU training: bf16 autocast where supported)")
    print(f"model cache   {cache_root()} (KOLORA_CACHE)")


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
    if args.command == "train":
        from .train import train

        if args.resume:
            from .runs import open_run

            run = open_run(args.resume, need_adapter=False)
            # only the length of the run may change on resume
            train(apply_flags(run.config(), args, ("train.max_steps", "train.epochs")), resume=args.resume)
        else:
            train(build_config(args), dry_run=args.dry_run, force=args.force)
    elif args.command == "prepare":
        cmd_prepare(args)
    elif args.command == "chat":
        from .chat import interactive, quick_test

        if args.quick_test:
            quick_test(args.run, args.quick_test, gen_config(args), compare=args.compare, base=args.base)
        else:
            interactive(args.run, gen_config(args), base=args.base, question=args.question)
    elif args.command == "merge":
        from .merge import merge

        merge(args.run, args.out, args.force)
    elif args.command == "models":
        cmd_models(args)
    elif args.command == "inspect":
        from .models import inspect_model

        print(inspect_model(args.model, args.r, args.trust_remote_code))
    elif args.command == "doctor":
        cmd_doctor(args)
    elif args.command in VERB_MODULES:
        return importlib.import_module(f"kolora.{VERB_MODULES[args.command]}").run(args) or 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
