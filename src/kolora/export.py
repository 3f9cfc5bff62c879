"""`kolora export RUN --format gguf`: a GGUF that llama.cpp and Ollama run, answering like the run.

1. Merge the adapter into a float32 base (`kolora.merge`, which checks logits against the adapter).
2. Put the training prompt format into the merged tokenizer as a Jinja chat template — the run's
   own template, or a Jinja equivalent of kolora's fallback (`### 질문:` / `### 답변:`) — and check
   that it renders exactly what `kolora.prompt.render_prompt` renders.
3. Convert with llama.cpp's own `convert_hf_to_gguf.py` (vendored in `kolora/_vendor/llama_cpp`,
   run in a subprocess so its bundled `gguf-py` never mixes with the installed `gguf`).
4. Round trip: read the GGUF back with transformers (which dequantizes it) and compare next-token
   logits with the merged model on a few training-format prompts; the GGUF's tokenizer plus its chat
   template must produce the ids the model was trained on. Figures go to `kolora-export.json`.
5. Write an Ollama `Modelfile` whose TEMPLATE, SYSTEM and stop parameters match training.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .errors import KoloraError

HELP = "export a run as GGUF for llama.cpp / Ollama (chat template kept, round trip checked)"

VENDOR = Path(__file__).resolve().parent / "_vendor" / "llama_cpp"

# Max |next-token logit difference| between the GGUF (dequantized by transformers) and the merged
# float32 model; the next token must also be the same. f16 rounds each weight to 11 significant bits,
# q8_0 stores 8-bit weights with one scale per 32. Measured on a Gemma-3 270M run: f16 0.015,
# q8_0 0.47 (logits span about ±30). The limits leave room for other models and prompts; a broken
# export (wrong tensor layout, lost norm offsets, wrong vocabulary) is off by whole units.
TOLERANCE = {"f16": 0.1, "q8_0": 1.5}

# What each --quant costs, for the export's output. The figures behind these words are in the
# README's export table: `python bench/export_agreement.py runs/demo [--dtype float32]` (57 test
# questions, greedy, 64 tokens; AMD EPYC). Identical first 20 tokens against kolora in float32:
# f16 57/57, q8_0 50/57 (whole answers 55/57 and 21/57); against chat's bf16: f16 54/57, q8_0
# 48/57. f16 is the default: the smallest quant that keeps the answers.
BYTES_PER_WEIGHT = {"f16": 2.0, "q8_0": 34 / 32}  # q8_0: 32 int8 weights + one f16 scale per block
QUANT_COST = {"f16": "answers as the tuned model does (greedy)",
              "q8_0": "about half the size, but some answers drift from the tuned model's after a few tokens"}

# A 270M model converts in seconds and an 8B one in minutes; a converter stuck far beyond that
# (a hung file system, swapping) should end with a message rather than hold the terminal forever.
CONVERT_TIMEOUT = 1800.0
MARKER = "kolora-export.json"  # marks the folder as a kolora export and lists what it wrote

# Architectures whose GGUF transformers can read back (`gguf_file=`); others convert but the
# round trip cannot be run here.
ROUND_TRIP_ARCHS = {"llama", "gemma2", "gemma3", "gpt2", "qwen2", "qwen3", "phi3", "mistral", "stablelm",
                    "starcoder2", "falcon", "bloom", "nemotron", "lfm2"}


def add_arguments(p) -> None:
    p.add_argument("run", help="run directory written by `kolora train`")
    p.add_argument("--format", default="gguf", choices=["gguf"], help="output format")
    p.add_argument("--quant", default="f16", choices=sorted(TOLERANCE),
                   help="GGUF tensor type: f16 (default: the smallest that answers as kolora chat does, measured) "
                        "or q8_0 (about half the size; some answers drift after a few tokens)")
    p.add_argument("--out", required=True, help="output directory (GGUF, Modelfile, kolora-export.json)")
    p.add_argument("--force", action="store_true",
                   help="replace the files of a previous export in --out (listed in its kolora-export.json)")
    p.add_argument("--keep-merged", action="store_true", help="keep the merged Hugging Face model in OUT/merged")
    p.add_argument("--no-check", action="store_true", help="skip the round-trip check (not recommended)")
    p.add_argument("--convert-timeout", type=float, default=CONVERT_TIMEOUT, metavar="SECONDS",
                   help=f"stop llama.cpp's converter after this long (default {CONVERT_TIMEOUT:g})")


def run(args) -> int:
    result = export(args.run, args.out, quant=args.quant, force=args.force, keep_merged=args.keep_merged,
                    check=not args.no_check, convert_timeout=args.convert_timeout)
    return 0 if result["ok"] else 1


# --------------------------------------------------------------------------- chat templates
def _literal(text: str | None) -> str:
    """A Jinja string literal (JSON escapes are valid Jinja, and llama.cpp's minja reads them too)."""
    return "none" if text is None else json.dumps(text, ensure_ascii=False)


def fallback_jinja(default_system: str | None) -> str:
    """Jinja equivalent of kolora's fallback prompt (`kolora.prompt.render_prompt` without a template).

    Every piece of output is a string expression and every tag trims whitespace, so the template's
    own line breaks never reach the prompt. A user message that starts with the passages marker
    (`prompt.user_text` of a grounded question: passages, then `### 질문:`) is written as it is."""
    from .prompt import A_MARK, CONTEXT_MARK, Q_MARK

    q, a, ctx = _literal(Q_MARK + "\n"), _literal(A_MARK + "\n"), _literal(CONTEXT_MARK)
    return (
        "{%- set ns = namespace(system=" + _literal(default_system) + ") -%}\n"
        "{%- if messages and messages[0]['role'] == 'system' and messages[0]['content'] -%}\n"
        "  {%- set ns.system = messages[0]['content'] -%}\n"
        "{%- endif -%}\n"
        "{%- if ns.system -%}{{ ns.system + '\\n\\n' }}{%- endif -%}\n"
        "{%- for m in messages -%}\n"
        "  {%- if m['role'] == 'user' and m['content'].startswith(" + ctx + ") -%}{{ m['content'] + '\\n\\n' }}\n"
        "  {%- elif m['role'] == 'user' -%}{{ " + q + " + m['content'] + '\\n\\n' }}\n"
        "  {%- elif m['role'] == 'assistant' -%}{{ " + a + " + m['content'] + '\\n\\n' }}\n"
        "  {%- endif -%}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{ " + a + " }}{%- endif -%}"
    )


def with_default_system(template: str, system: str) -> str:
    """The model's own template, with the run's system prompt where the request brings none
    (render_prompt puts data.system_prompt into every prompt)."""
    return ("{%- if not (messages and messages[0]['role'] == 'system' and messages[0]['content']) -%}\n"
            "  {%- set messages = [{'role': 'system', 'content': " + _literal(system) + "}] + messages -%}\n"
            "{%- endif -%}\n" + template)


def training_bos(run_tokenizer, cfg) -> bool:
    """Whether training put the tokenizer's BOS first in every prompt (Gemma, Llama: yes; GPT-2,
    ChatML models: no). Every client of the export must then give exactly one BOS too."""
    from .data import Example
    from .prompt import encode_prompt

    ids = encode_prompt(run_tokenizer, Example("질문", ""), cfg.data.system_prompt, cfg.data.template)
    return run_tokenizer.bos_token_id is not None and ids[:1] == [run_tokenizer.bos_token_id]


def export_template(run_tokenizer, cfg) -> tuple[str, str]:
    """(kind, Jinja template) reproducing the prompts the run was trained on, BOS included.

    Where training began each prompt with BOS and the template does not write it, the template
    starts with `{{ bos_token }}`, as Gemma's own template does: llama-cpp-python's chat
    completion tokenizes a rendered template without adding BOS (the template is trusted to
    place special tokens), llama-server strips a leading BOS from the rendering when the GGUF
    adds its own, and transformers' apply_chat_template adds none either; so each ends with one."""
    from .data import Example
    from .prompt import render_prompt, uses_chat_template

    system = cfg.data.system_prompt
    if uses_chat_template(run_tokenizer, cfg.data.template):
        template = run_tokenizer.chat_template
        kind, template = "model", with_default_system(template, system) if system else template
    else:
        kind, template = "kolora-fallback", fallback_jinja(system)
    rendered = render_prompt(run_tokenizer, Example("질문", ""), system, cfg.data.template)
    if training_bos(run_tokenizer, cfg) and not rendered.startswith(run_tokenizer.bos_token):
        template = "{{ bos_token }}" + template
    return kind, template


def probe_examples(questions: list[str]):
    """Conversations that exercise every branch of a template: plain, grounded, own system prompt, history."""
    from .data import Example

    q = questions[0]
    history = [{"role": "user", "content": "전세권이란 무엇인가요?"},
               {"role": "assistant", "content": "전세금을 지급하고 타인의 부동산을 점유하여 사용·수익하는 권리입니다."}]
    passages = "[민법 제312조 (전세권의 존속기간)] ① 전세권의 존속기간은 10년을 넘지 못한다."
    return [Example(x, "") for x in questions] + [
        Example(q, "", context=passages),  # a grounded question: its passages travel in the user message
        Example(q, "", system="당신은 한국 민법 상담 도우미입니다."),
        Example(q, "", history=history),
        Example(q, "", history=history, system="간단히 답하세요."),
    ]


def messages_of(ex) -> list[dict]:
    """The chat messages a client sends for `ex`; a grounded question carries its passages in the
    user message (`prompt.user_text`), which every exported template lays out as training did."""
    from .prompt import user_text

    return ([{"role": "system", "content": ex.system}] if ex.system else []) + list(ex.history) + \
        [{"role": "user", "content": user_text(ex)}]


def template_ids(tokenizer, ex, chat_template: str | None = None) -> list[int]:
    """transformers' apply_chat_template, tokenized (it adds no special tokens of its own)."""
    return list(tokenizer.apply_chat_template(messages_of(ex), chat_template=chat_template, tokenize=True,
                                              add_generation_prompt=True, return_dict=False))


def check_template(run_tokenizer, merged_tokenizer, cfg, examples) -> None:
    """The exported template must give exactly the ids training gave (BOS included), or the GGUF
    answers badly."""
    from .prompt import encode_prompt, render_prompt

    for ex in examples:
        want = encode_prompt(run_tokenizer, ex, cfg.data.system_prompt, cfg.data.template)
        if template_ids(merged_tokenizer, ex) != want:
            got = merged_tokenizer.apply_chat_template(messages_of(ex), tokenize=False, add_generation_prompt=True)
            text = render_prompt(run_tokenizer, ex, cfg.data.system_prompt, cfg.data.template)
            raise KoloraError(f"the exported chat template renders {got[:80]!r}… (ids {template_ids(merged_tokenizer, ex)[:6]}…) "
                              f"but training used {text[:80]!r}… (ids {want[:6]}…)",
                              "report this with the run's config.yaml (data.template / system_prompt)")


# --------------------------------------------------------------------------- Ollama
def _go_string(text: str) -> str:
    """A Modelfile triple-quoted value; a literal triple quote cannot be expressed there."""
    if '"""' in text:
        raise KoloraError('the system prompt contains """, which an Ollama Modelfile cannot hold',
                          "change data.system_prompt")
    return f'"""{text}"""'


def fallback_go() -> str:
    """The fallback prompt as an Ollama (Go text/template) TEMPLATE; like `fallback_jinja`, a user
    message that starts with the passages marker is written as it is. (Go's `and` stops at the
    first false argument, so `slice` never reads past a short message.)"""
    from .prompt import A_MARK, CONTEXT_MARK, Q_MARK

    n = len(CONTEXT_MARK.encode("utf-8"))  # Go slices strings by bytes
    return (
        '{{ range .Messages }}{{ if eq .Role "system" }}{{ .Content }}\n\n'
        f'{{{{ else if and (eq .Role "user") (ge (len .Content) {n}) (eq (slice .Content 0 {n}) "{CONTEXT_MARK}") }}}}'
        '{{ .Content }}\n\n'
        f'{{{{ else if eq .Role "user" }}}}{Q_MARK}\n{{{{ .Content }}}}\n\n'
        f'{{{{ else if eq .Role "assistant" }}}}{A_MARK}\n{{{{ .Content }}}}\n\n'
        f'{{{{ end }}}}{{{{ end }}}}{A_MARK}\n'
    )


CHATML_GO = (
    '{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
    '{{ end }}<|im_start|>assistant\n'
)


def chatml_default_system(run_tokenizer) -> str | None:
    """The system prompt a ChatML template injects by itself (SmolLM2 does), so Ollama can inject it too."""
    text = run_tokenizer.apply_chat_template([{"role": "user", "content": "PROBE"}], tokenize=False,
                                             add_generation_prompt=True)
    head, sep, _ = text.partition("<|im_start|>user\n")
    prefix = "<|im_start|>system\n"
    if sep and head.startswith(prefix) and head.endswith("<|im_end|>\n"):
        return head[len(prefix):-len("<|im_end|>\n")]
    return None


GROUNDED_NOTE = [
    "# This model was trained to answer from retrieved statute text (retrieval.corpus): without the",
    "# passages before the question it answers from memory, and mostly wrong. Ollama does no retrieval:",
    "# `kolora serve RUN` retrieves, answers and returns the sources (OpenAI API + web page); or send the",
    "# passages yourself: the user message \"### 참고 조문:\\n{passages}\\n\\n### 질문:\\n{question}\" is laid out",
    "# exactly as in training (`kolora retrieve RUN \"질문\"` shows the passages the run's index finds).",
]


def modelfile(gguf_name: str, kind: str, run_tokenizer, cfg, gen) -> tuple[str, str]:
    """(Modelfile text, how its TEMPLATE was made). Ollama templates are Go templates, so known
    formats are translated; an unknown one is left to Ollama's own detection from the GGUF."""
    from .prompt import Q_MARK

    system = cfg.data.system_prompt
    stops = [run_tokenizer.eos_token]
    lines = ["# Ollama: ollama create NAME -f Modelfile && ollama run NAME"]
    if cfg.retrieval.corpus:
        lines += GROUNDED_NOTE
    lines.append(f"FROM ./{gguf_name}")
    if kind == "kolora-fallback":
        lines.append("TEMPLATE " + _go_string(fallback_go()))
        stops.append(Q_MARK)  # a model that forgets EOS would write the next question itself
        how = "kolora fallback (### 질문: / ### 답변:)"
    elif "<|im_start|>" in (run_tokenizer.chat_template or ""):
        lines.append("TEMPLATE " + _go_string(CHATML_GO))
        system = system or chatml_default_system(run_tokenizer)
        stops += ["<|im_end|>", "<|im_start|>"]
        how = "ChatML"
    else:
        lines.append("# TEMPLATE: Ollama derives it from the GGUF's tokenizer.chat_template")
        how = "from the GGUF (no Go translation for this template)"
    if system:
        lines.append("SYSTEM " + _go_string(system))
    for stop in dict.fromkeys(s for s in stops if s):
        lines.append(f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}")
    # the defaults of `kolora chat`, so both answer alike
    lines += [f"PARAMETER temperature {gen.temperature:g}", f"PARAMETER top_p {gen.top_p:g}",
              # Ollama's own default is 1.1 over the last 64 tokens; chat's is none (a penalty is counted
              # differently by transformers and llama.cpp, so only "none" answers alike)
              f"PARAMETER repeat_penalty {gen.repetition_penalty:g}", f"PARAMETER num_predict {gen.max_new_tokens}"]
    return "\n".join(lines) + "\n", how


# --------------------------------------------------------------------------- conversion
def prepare_for_converter(merged: Path) -> None:
    """transformers 5 no longer saves GPT-2's `n_ctx`, which the converter reads."""
    config_file = merged / "config.json"
    config = json.loads(config_file.read_text())
    if config.get("model_type") == "gpt2" and "n_ctx" not in config:
        config["n_ctx"] = config.get("n_positions", 1024)
        config_file.write_text(json.dumps(config, indent=2))


def convert(merged: Path, gguf_path: Path, quant: str, log_path: Path, timeout: float = CONVERT_TIMEOUT) -> float:
    if not (VENDOR / "convert_hf_to_gguf.py").is_file():
        raise KoloraError(f"llama.cpp's converter is missing from {VENDOR}", "reinstall kolora")
    t0 = time.time()
    cmd = [sys.executable, "-m", "kolora.export", "--llama-cpp-convert", str(merged),
           "--outtype", quant, "--outfile", str(gguf_path)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:  # run() has killed the converter; its output so far is bytes
        log_path.write_text("".join(x.decode(errors="replace") if isinstance(x, bytes) else x
                                    for x in (e.stdout, e.stderr) if x))
        raise KoloraError(f"llama.cpp's converter did not finish within {timeout:g} s",
                          f"raise --convert-timeout for a large model or a slow disk; its output so far is in {log_path}")
    log_path.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not gguf_path.is_file():
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        last = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "")
        hint = f"full converter output in {log_path}"
        if "not supported" in last:
            hint = "llama.cpp has no converter for this architecture; " + hint
        elif "pre-tokenizer" in last:
            hint = "llama.cpp does not know this tokenizer's pre-tokenizer; " + hint
        raise KoloraError(f"llama.cpp's converter failed: {last.strip()}", hint)
    return time.time() - t0


def _convert_main(argv: list[str]) -> None:
    """Runs in the converter subprocess: llama.cpp's script with its own gguf-py first on the path.

    One addition: a byte-level BPE tokenizer whose pre-tokenizer is exactly GPT-2's (HF
    `ByteLevel` with its regex, no normalizer) but whose vocabulary llama.cpp has never hashed
    gets the `gpt-2` pre-tokenizer, which is the same regex. Any other unknown tokenizer still
    fails as llama.cpp decides."""
    sys.path[:0] = [str(VENDOR), str(VENDOR / "gguf-py")]
    os.environ["NO_LOCAL_GGUF"] = "1"  # already on the path, first
    import convert_hf_to_gguf  # noqa: E402 - vendored llama.cpp
    from conversion.base import TextModel

    known = TextModel.get_vocab_base_pre

    def vocab_pre(self, tokenizer):
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            if gpt2_pretokenizer(Path(self.dir_model)):
                return "gpt-2"
            raise

    TextModel.get_vocab_base_pre = vocab_pre
    sys.argv = ["convert_hf_to_gguf.py", *argv]
    convert_hf_to_gguf.main()


def gpt2_pretokenizer(model_dir: Path) -> bool:
    try:
        spec = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    pre = spec.get("pre_tokenizer") or {}
    return (pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not spec.get("normalizer")
            and (spec.get("model") or {}).get("type") == "BPE")


# --------------------------------------------------------------------------- round trip
def gguf_metadata(path: Path) -> dict:
    """The few GGUF keys the checks need, read with the installed `gguf` reader."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    wanted = {"general.architecture": "arch", "tokenizer.chat_template": "chat_template",
              "tokenizer.ggml.add_bos_token": "add_bos", "tokenizer.ggml.bos_token_id": "bos_id",
              "tokenizer.ggml.eos_token_id": "eos_id", "tokenizer.ggml.pre": "pre",
              "tokenizer.ggml.model": "tokenizer_model"}
    meta = {}
    for key, name in wanted.items():
        field = reader.get_field(key)
        if field is not None:
            meta[name] = field.contents()
    meta["file_type"] = int(reader.get_field("general.file_type").contents()) \
        if reader.get_field("general.file_type") is not None else None
    tokens = reader.get_field("tokenizer.ggml.tokens")
    if tokens is not None:  # straight from the parts: contents() takes seconds on a 262k vocabulary
        meta["tokens"] = [tokens.parts[i].tobytes().decode("utf-8", errors="replace") for i in tokens.data]
    return meta


def set_gguf_bool(path: Path, key: str, value: bool) -> bool:
    """Rewrite one boolean metadata value of a GGUF in place (as gguf-py's gguf_set_metadata does);
    False when the file has no such key."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path), "r+")
    field = reader.get_field(key)
    if field is None:
        return False
    field.parts[field.data[0]][0] = value
    reader.data.flush()
    return True


def load_gguf_model(path: Path, arch: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    if arch == "gpt2":  # transformers maps gpt2.context_length to n_ctx only; positions live in n_positions
        config.n_positions = config.n_ctx
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, config=config,
                                                 dtype=torch.float32)
    return model.eval()


def next_token_logits(model, prompts: list[list[int]]):
    import torch

    with torch.no_grad():
        return [model(input_ids=torch.tensor([p])).logits[0, -1].float() for p in prompts]


def gguf_adds_bos(meta: dict) -> bool:
    """Whether llama.cpp adds BOS when it tokenizes with special tokens: the GGUF's
    `tokenizer.ggml.add_bos_token`, else llama.cpp's default for the vocabulary type."""
    if meta.get("add_bos") is not None:
        return bool(meta["add_bos"])
    return meta.get("tokenizer_model") in ("llama", "bert")


def client_prompt_ids(meta: dict, merged_tokenizer, ex) -> dict[str, list[int]]:
    """The ids each client of the GGUF feeds the model for `ex`, as its source does it:

    - llama-cpp-python `create_chat_completion` (Jinja2ChatFormatter): renders the GGUF's template
      with `bos_token` and tokenizes the text with special tokens parsed, adding no BOS;
    - `llama-server --jinja` (common/chat.cpp): renders the template, strips a leading BOS from the
      text when the GGUF adds one, then tokenizes adding BOS as the GGUF says;
    - Ollama: executes the Modelfile's Go TEMPLATE, which writes the same text without BOS (the
      tests execute it with Go), and tokenizes adding BOS as the GGUF says;
    - transformers: `apply_chat_template(tokenize=True)` with the GGUF's template.

    The vocabulary itself is compared token by token (`vocab_mismatches`), so the merged
    tokenizer stands in for llama.cpp's here (transformers cannot read every GGUF vocabulary
    type back, e.g. Gemma's ▁-BPE)."""
    bos_id, bos = meta.get("bos_id"), merged_tokenizer.bos_token or ""
    adds = [int(bos_id)] if gguf_adds_bos(meta) and bos_id is not None else []
    tok = lambda text: merged_tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    text = merged_tokenizer.apply_chat_template(messages_of(ex), chat_template=meta["chat_template"],
                                                tokenize=False, add_generation_prompt=True)
    no_bos = text[len(bos):] if bos and text.startswith(bos) else text
    return {"llama-cpp-python": tok(text), "llama-server": adds + tok(no_bos if adds else text),
            "ollama": adds + tok(no_bos),  # the Go template writes the same text, without BOS
            "transformers": template_ids(merged_tokenizer, ex, meta["chat_template"])}


def vocab_mismatches(meta: dict, tokenizer) -> list[dict]:
    """Token strings that differ between the GGUF and the tokenizer, by id."""
    tokens = meta.get("tokens") or []
    n = min(len(tokens), len(tokenizer))
    hf = tokenizer.convert_ids_to_tokens(list(range(n)))
    bad = [{"id": i, "gguf": g, "tokenizer": t} for i, (g, t) in enumerate(zip(tokens, hf)) if g != t]
    if len(tokens) < len(tokenizer):
        bad.append({"id": len(tokens), "gguf": None, "tokenizer": f"{len(tokenizer) - len(tokens)} more tokens"})
    return bad


def round_trip(gguf_path: Path, merged: Path, meta: dict, run_tokenizer, merged_tokenizer, cfg, examples,
               quant: str) -> dict:
    """Prompt ids, vocabulary and EOS always; next-token logits where transformers reads the arch."""
    from transformers import AutoModelForCausalLM

    from .prompt import encode_prompt

    train_ids = [encode_prompt(run_tokenizer, ex, cfg.data.system_prompt, cfg.data.template) for ex in examples]
    id_mismatch, clients = [], []
    for ex, want in zip(examples, train_ids):
        for client, got in client_prompt_ids(meta, merged_tokenizer, ex).items():
            clients.append(client)
            if got != want:
                id_mismatch.append({"client": client, "question": ex.question[:60], "training_ids": want[:12],
                                    "client_ids": got[:12]})
    vocab_bad = vocab_mismatches(meta, merged_tokenizer)
    # llama.cpp and Ollama stop at the GGUF's EOS: it must be the token training put after every answer
    eos_ok = meta.get("eos_id") is not None and int(meta["eos_id"]) == run_tokenizer.eos_token_id
    rt = {"prompts": len(train_ids), "clients": sorted(set(clients)), "prompt_ids_match": not id_mismatch,
          "id_mismatch": id_mismatch[:10],
          "vocab_match": not vocab_bad, "vocab_mismatch": vocab_bad[:10], "eos_match": eos_ok}
    tokens_ok = not id_mismatch and not vocab_bad and eos_ok
    arch = meta.get("arch")
    if arch not in ROUND_TRIP_ARCHS:
        return {**rt, "checked": False, "reason": f"transformers cannot read '{arch}' GGUF files back",
                "ok": tokens_ok}
    merged_model = AutoModelForCausalLM.from_pretrained(merged, dtype="float32").eval()
    want_logits = next_token_logits(merged_model, train_ids)
    del merged_model
    got_logits = next_token_logits(load_gguf_model(gguf_path, arch), train_ids)
    diffs = [float((a - b).abs().max()) for a, b in zip(want_logits, got_logits)]
    same_next = [int(a.argmax()) == int(b.argmax()) for a, b in zip(want_logits, got_logits)]
    tolerance = TOLERANCE[quant]
    return {**rt, "checked": True, "max_logit_diff": max(diffs), "logit_diffs": [round(d, 5) for d in diffs],
            "tolerance": tolerance, "same_next_token": all(same_next),
            "ok": tokens_ok and max(diffs) <= tolerance and all(same_next)}


# --------------------------------------------------------------------------- the verb
def export(run_path: str, out: str, quant: str = "f16", force: bool = False, keep_merged: bool = False,
           check: bool = True, convert_timeout: float = CONVERT_TIMEOUT) -> dict:
    from .runs import claim_output_dir, open_run, swap_in, temp_dir_beside

    if quant not in TOLERANCE:
        raise KoloraError(f"unknown --quant '{quant}'", f"use one of {', '.join(sorted(TOLERANCE))}")
    if not convert_timeout > 0:
        raise KoloraError(f"--convert-timeout must be positive (got {convert_timeout:g})",
                          f"give the converter seconds to run, e.g. {CONVERT_TIMEOUT:g}")
    run = open_run(run_path)
    out_dir = Path(os.path.abspath(Path(out).expanduser()))
    gguf_name = f"{run.path.resolve().name}-{quant}.gguf"
    # --force replaces only the files a previous export listed; nothing is touched until the new
    # export is complete
    replaced = claim_output_dir(out_dir, "export", force,
                                writes=[gguf_name, "Modelfile", "convert.log", MARKER, "merged"])
    # Everything is written into a folder beside --out and renamed in only on success: a full disk,
    # a failed conversion or Ctrl-C leaves the previous export whole and no float32 merged/ or
    # partial GGUF anywhere.
    work = temp_dir_beside(out_dir)
    try:
        result = _export_into(work, run, gguf_name, quant, keep_merged, check, convert_timeout, out_dir)
        swap_in(work, out_dir, replaced, MARKER)
    except OSError as e:
        shutil.rmtree(work, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise KoloraError(f"disk full while exporting to {out_dir} ({e.strerror}); "
                              + ("the previous export is unchanged" if replaced else "nothing was left behind"),
                              f"free space on {out_dir.parent} (the export needs room for a float32 copy of the "
                              "model and the GGUF) and run it again") from None
        raise
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    report(result, out_dir)
    rt = result["round_trip"]
    if not result["ok"]:
        problems = []
        if rt.get("checked") and rt["max_logit_diff"] > rt["tolerance"]:
            problems.append(f"max logit difference {rt['max_logit_diff']:.3g} > {rt['tolerance']:g}")
        if rt.get("checked") and not rt["same_next_token"]:
            problems.append("a different next token")
        if not rt["prompt_ids_match"]:
            bad = sorted({m["client"] for m in rt["id_mismatch"]})
            problems.append(f"{', '.join(bad)} would feed other prompt ids than training (template or BOS)")
        if not rt["eos_match"]:
            problems.append("the GGUF's EOS is not the token training ended answers with")
        if not rt["vocab_match"]:
            problems.append(f"{len(rt['vocab_mismatch'])}+ tokens differ from the tokenizer's")
        raise KoloraError(f"the GGUF does not answer like the merged model: {'; '.join(problems)} "
                          f"(details in {out_dir / MARKER})",
                          "try --quant f16; if it persists, report it with convert.log")
    return result


def _export_into(work: Path, run, gguf_name: str, quant: str, keep_merged: bool, check: bool,
                 convert_timeout: float, out_dir: Path) -> dict:
    """Steps 1-5 of the module docstring, writing only into `work` (renamed to `out_dir` after)."""
    from transformers import AutoTokenizer

    from .data import read_jsonl
    from .generation import GenConfig
    from .merging import merge

    cfg = run.config()
    t0 = time.time()

    merged = work / "merged"
    merge_result = merge(str(run.path), str(merged))
    run_tokenizer = AutoTokenizer.from_pretrained(run.tokenizer)
    kind, template = export_template(run_tokenizer, cfg)
    merged_tokenizer = AutoTokenizer.from_pretrained(merged)
    merged_tokenizer.chat_template = template
    merged_tokenizer.save_pretrained(merged)
    test = read_jsonl(run.split("test")) if run.split("test").is_file() else []
    examples = probe_examples([ex.question for ex in test[:3]] or ["전세권의 존속기간은 얼마인가요?"])
    check_template(run_tokenizer, merged_tokenizer, cfg, examples)
    prepare_for_converter(merged)

    gguf_path = work / gguf_name
    print(f"[kolora] converting with llama.cpp's convert_hf_to_gguf.py ({quant}) …", flush=True)
    log = work / "convert.log"
    try:
        seconds = convert(merged, gguf_path, quant, log, timeout=convert_timeout)
        meta = gguf_metadata(gguf_path)
        # llama-server and Ollama add BOS when the GGUF says so; it must say what training did
        # (a chat template without BOS on a tokenizer that adds one: TinyLlama-Chat)
        bos = training_bos(run_tokenizer, cfg)
        if meta.get("add_bos") is not None and bool(meta["add_bos"]) != bos \
                and set_gguf_bool(gguf_path, "tokenizer.ggml.add_bos_token", bos):
            meta["add_bos"] = bos
        if meta.get("chat_template") != template:
            raise KoloraError(f"{gguf_path.name} lacks the chat template that was written into the merged tokenizer",
                              f"see {log}")
    except KoloraError as e:
        # The temp folder goes, but the log the message points to must stay; not in or beside
        # --out, whose folder holds only what the user asked for.
        if not log.is_file():
            raise
        fd, kept = tempfile.mkstemp(prefix=f"kolora-convert-{out_dir.name}-", suffix=".log")
        os.close(fd)
        shutil.copyfile(log, kept)
        raise KoloraError(str(e), (e.hint or "").replace(str(log), kept)) from None

    text, how = modelfile(gguf_path.name, kind, run_tokenizer, cfg, GenConfig())
    (work / "Modelfile").write_text(text, encoding="utf-8")

    if check:
        print("[kolora] round trip: reading the GGUF back with transformers …", flush=True)
        rt = round_trip(gguf_path, merged, meta, run_tokenizer, merged_tokenizer, cfg, examples, quant)
    else:
        rt = {"checked": False, "reason": "--no-check"}
    if not keep_merged:
        shutil.rmtree(merged)
    result = {
        "run": str(run.path), "base": cfg.model.name, "gguf": gguf_path.name, "quant": quant,
        "size_mb": round(gguf_path.stat().st_size / 2**20, 1), "arch": meta.get("arch"),
        "tokenizer_pre": meta.get("pre"), "add_bos": bool(meta.get("add_bos")),
        "chat_template": kind, "modelfile_template": how,
        "merge_max_logit_diff": merge_result["max_logit_diff"], "convert_seconds": round(seconds, 1),
        "round_trip": rt, "seconds": round(time.time() - t0, 1),
        "converter": "llama.cpp convert_hf_to_gguf.py from llama-cpp-python 0.3.36 (vendored)",
        "grounded": bool(cfg.retrieval.corpus),
        # what this export wrote: a later --force replaces these and nothing else in --out
        "files": sorted([p.name for p in work.iterdir()] + [MARKER]),
    }
    result["ok"] = rt.get("ok", True)
    (work / MARKER).write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    return result


def report(result: dict, out_dir: Path) -> None:
    rt = result["round_trip"]
    yes = lambda flag: "yes" if flag else "NO"  # noqa: E731
    print(f"GGUF: {out_dir / result['gguf']} ({result['size_mb']} MB, {result['arch']}, {result['quant']}, "
          f"chat template: {result['chat_template']})")
    other = "f16" if result["quant"] == "q8_0" else "q8_0"
    size = result["size_mb"] * BYTES_PER_WEIGHT[other] / BYTES_PER_WEIGHT[result["quant"]]
    print(f"--quant {result['quant']}: {QUANT_COST[result['quant']]}; --quant {other} would be about {size:,.0f} MB "
          f"and {QUANT_COST[other]} (`python bench/export_agreement.py RUN` measures both against kolora chat)")
    print(f"Ollama: {out_dir / 'Modelfile'} (template: {result['modelfile_template']}) — "
          f"cd {out_dir} && ollama create NAME -f Modelfile")
    if result.get("grounded"):
        print("NOTE: this run is grounded — it expects retrieved statute text before each question, which "
              "llama.cpp and Ollama do not add. Serve it with `kolora serve RUN` (retrieval + sources), or put the "
              "passages in the prompt yourself (see the Modelfile's comment).")
    if "prompts" not in rt:
        print(f"WARNING: round trip NOT checked ({rt['reason']})", file=sys.stderr)
        return
    tokens = (f"prompt ids as in training: {yes(rt['prompt_ids_match'])}, vocabulary identical: "
              f"{yes(rt['vocab_match'])}, EOS: {yes(rt['eos_match'])}")
    if rt["checked"]:
        print(f"round trip {'OK' if rt['ok'] else 'FAILED'}: max next-token logit difference "
              f"{rt['max_logit_diff']:.4f} (limit {rt['tolerance']:g}) over {rt['prompts']} prompts, same next "
              f"token: {yes(rt['same_next_token'])}, {tokens}")
    else:
        print(f"round trip {'OK' if rt['ok'] else 'FAILED'} for the tokenizer: {tokens}")
        print(f"WARNING: logit round trip NOT checked — {rt['reason']}; the weights were written by llama.cpp's "
              "converter but kolora could not compare them", file=sys.stderr)


if __name__ == "__main__" and sys.argv[1:2] == ["--llama-cpp-convert"]:
    _convert_main(sys.argv[2:])
