"""Fixtures: tiny randomly initialised models of every supported architecture, with an
offline byte-level BPE tokenizer trained here on the bundled Korean data (so Korean text
tokenizes sensibly and nothing is downloaded)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Under pytest-xdist (`make test` runs two workers on a 2-core machine) each worker and every kolora
# process it starts uses one torch thread: two workers with two threads each would oversubscribe
# the cores, and most tests here are bound by Python work (imports, tokenizing), not by matmuls.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "civil_law_qa.csv"
ARCHS = ["gpt2", "llama", "gemma3", "phi"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# The user's kolora cache, as it was before the tests pointed KOLORA_CACHE elsewhere.
USER_CACHE = Path(os.environ.get("KOLORA_CACHE") or Path.home() / ".cache" / "kolora")
SHARED = ("models", "gguf")  # the converted bundled models (~90 s to convert Gemma) and the GGUF they come from


@pytest.fixture(autouse=True, scope="session")
def _offline_env(tmp_path_factory):
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["KOLORA_CACHE"] = str(session_cache(tmp_path_factory.mktemp("kolora-cache")))
    yield


def session_cache(cache: Path) -> Path:
    """Each test session has its own cache: eval's base answers and the weight-file hashes of one
    session never leak into the next or into the user's. Only the converted bundled models are
    shared, linked from the user's cache: a model missing there is converted into it, once."""
    for name in SHARED:
        try:
            (USER_CACHE / name).mkdir(parents=True, exist_ok=True)
            (cache / name).symlink_to(USER_CACHE / name, target_is_directory=True)
        except OSError:
            pass  # no usable user cache: this session converts into its own
    return cache


def corpus() -> list[str]:
    texts = ["### 질문:", "### 답변:", "전세권 임대차 보증금 민법 제312조 제1항"]
    with open(DATA, encoding="utf-8") as f:
        for row in csv.DictReader(f):
            texts += [row["question"], row["answer"]]
    return texts


def make_tokenizer(chat_template: bool = False, bos: bool = False):
    """The tiny byte-level BPE tokenizer of the tests; `bos` makes it put <s> before every text,
    as Gemma's and Llama's tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    if chat_template:
        fast.chat_template = CHATML
        fast.eos_token = "<|im_end|>"
        fast.pad_token = "<|im_end|>"  # like SmolLM2: pad == eos, the case that breaks id-based masks
    return fast


def make_config(arch: str, vocab: int):
    from transformers import Gemma3TextConfig, GPT2Config, LlamaConfig, PhiConfig

    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=2, n_positions=512, **common)
    if arch == "llama":
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=512, **common)
    if arch == "gemma3":
        return Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=1, head_dim=32, max_position_embeddings=512, sliding_window=64,
                                **common)
    if arch == "phi":
        return PhiConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=512, **common)
    raise ValueError(arch)


def build_tiny(path: Path, arch: str, chat_template: bool = False, bos: bool = False) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    tok = make_tokenizer(chat_template, bos)
    model = AutoModelForCausalLM.from_config(make_config(arch, len(tok)))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    out = {arch: build_tiny(root / arch, arch) for arch in ARCHS}
    out["llama-chat"] = build_tiny(root / "llama-chat", "llama", chat_template=True)
    return out


@pytest.fixture(scope="session")
def small_csv(tmp_path_factory) -> Path:
    """60 rows of the bundled data (stratified split still has every category)."""
    path = tmp_path_factory.mktemp("data") / "small.csv"
    with open(DATA, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    by_cat: dict[str, list] = {}
    for r in rows:
        by_cat.setdefault(r["category"], []).append(r)
    picked = [r for cat in sorted(by_cat) for r in by_cat[cat][:10]]
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["question", "answer", "category", "difficulty"])
        w.writeheader()
        w.writerows(picked)
    return path


def run_cli(*args: str, env: dict | None = None, timeout: int = 600, cwd: Path | None = None):
    """Run `python -m kolora …` in a subprocess, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "kolora", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd or ROOT)


TINY_TRAIN = ["--train.max_steps", "6", "--train.batch_size", "4", "--train.grad_accum", "2", "--train.lr", "3e-3",
              "--train.eval_every", "3", "--train.save_every", "3", "--train.log_every", "1",
              "--train.tensorboard", "false", "--lora.r", "4", "--lora.alpha", "8", "--data.max_length", "512"]


# --------------------------------------------------------------------------- scheduling under xdist
# `make test` runs the suite on two pytest-xdist workers with `--dist loadgroup`. Tests that share a
# module-scoped fixture (a trained tiny run, a server) go to one worker together, so the fixture is
# built once; every other test is scheduled on its own. Units start longest first (the real-model
# tests, then the modules with the most work), so the two workers finish together instead of one
# running a 5-minute test alone at the end. Seconds as measured with `pytest --durations` on
# 2 cores (AMD EPYC, one torch thread per worker); only the order depends on them.
LONGEST_FIRST = {
    "test_slow.py::test_real_gemma3_270m_trains_chats_exports": 400,
    "test_reliability.py": 300,
    "test_export.py": 160,
    "test_slow.py::test_compiled_layers_train_like_eager[gemma3]": 110,
    "test_evaluate.py": 100,
    "test_serve.py": 90,
    "test_grounding.py": 70,
    "test_ownership.py": 60,
    "test_notebook.py": 60,
    "test_multidevice.py": 60,
    "test_slow.py::test_compiled_layers_train_like_eager[gpt2]": 50,
}


def _unit(item) -> str:
    module = item.nodeid.split("::")[0].split("/")[-1]
    fixtures = item._fixtureinfo.name2fixturedefs.values()
    shared = any(defs and defs[-1].scope == "module" for defs in fixtures)
    return module if shared else item.nodeid.split("/")[-1]


def pytest_collection_modifyitems(config, items):
    for item in items:
        unit = _unit(item)
        if unit != item.nodeid.split("/")[-1]:  # a test on its own is its own unit without a mark
            item.add_marker(pytest.mark.xdist_group(unit))
        item.stash[_WEIGHT] = LONGEST_FIRST.get(unit, 0)
    items.sort(key=lambda item: -item.stash[_WEIGHT])  # stable: collection order within a weight


_WEIGHT = pytest.StashKey[int]()


class _GroupSuffix:
    """`--dist loadgroup` schedules by the `@group` suffix that pytest-xdist's worker hook appends to
    each marked item's node id. pytest 9.2 keeps the id in `Node._id`, and xdist 3.8 still writes
    `_nodeid`, so the suffix was silently lost: every test became its own unit and each module-scoped
    fixture (the executed notebook, the two-process runs, the trained runs) was built on both workers.
    This runs after xdist's hook and adds the suffix only where it is missing."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items):
        if not getattr(config.option, "loadgroup", False):  # set on xdist workers under --dist loadgroup
            return
        from _pytest.nodeid import NodeId

        for item in items:
            mark = item.get_closest_marker("xdist_group")
            if mark is None or "@" in item.nodeid:
                continue
            item._id = NodeId.parse(f"{item.nodeid}@{mark.args[0]}")


def pytest_configure(config):
    config.pluginmanager.register(_GroupSuffix(), "kolora-xdist-group-suffix")
