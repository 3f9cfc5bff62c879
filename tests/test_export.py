"""`kolora export --format gguf`: llama.cpp's converter on tiny models of each architecture, the
chat template and Modelfile against kolora's prompt format, and the round-trip check."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import TINY_TRAIN, make_tokenizer, run_cli

from kolora import export as ex
from kolora.config import RunConfig
from kolora.data import Example
from kolora.errors import KoloraError
from kolora.prompt import encode_prompt, render_prompt

SYSTEM = "당신은 한국 민법 상담 도우미입니다. 근거 조문을 밝히세요."
HISTORY = [{"role": "user", "content": "전세권이란?"}, {"role": "assistant", "content": "전세금을 지급하고 쓰는 권리입니다."}]


PASSAGES = "[민법 제312조 (전세권의 존속기간)] ① 전세권의 존속기간은 10년을 넘지 못한다."


def conversations():
    """Every branch of a template: plain, own system prompt, history, and a grounded question (its
    retrieved passages travel in the user message)."""
    return [Example("전세권의 존속기간은?", ""), Example("보증금은?", "", system="짧게 답하세요."),
            Example("갱신은요?", "", history=HISTORY), Example("갱신은요?", "", history=HISTORY, system="짧게."),
            Example("전세권의 존속기간은?", "", context=PASSAGES),
            Example("최대 몇 년?", "", history=HISTORY, system="짧게.", context=PASSAGES)]


def config(system_prompt=None, template="auto") -> RunConfig:
    cfg = RunConfig()
    cfg.data.system_prompt = system_prompt
    cfg.data.template = template
    return cfg


def train(tiny_models, small_csv, root: Path, arch: str) -> Path:
    run = root / f"run-{arch}"
    if not run.exists():
        r = run_cli("train", "--model", str(tiny_models[arch]), "--data", str(small_csv), "--out", str(run),
                    *TINY_TRAIN)
        assert r.returncode == 0, r.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def runs(tiny_models, small_csv, tmp_path_factory):
    root = tmp_path_factory.mktemp("export-runs")
    return lambda arch: train(tiny_models, small_csv, root, arch)


# --------------------------------------------------------------------------- templates
@pytest.mark.parametrize("system_prompt", [None, SYSTEM])
def test_fallback_jinja_renders_the_training_prompt(system_prompt):
    """transformers' apply_chat_template with the exported Jinja == kolora.prompt.render_prompt."""
    plain = make_tokenizer(chat_template=False)
    cfg = config(system_prompt)
    kind, template = ex.export_template(plain, cfg)
    assert kind == "kolora-fallback"
    exported = make_tokenizer(chat_template=False)
    exported.chat_template = template
    for conv in conversations():
        want = render_prompt(plain, conv, cfg.data.system_prompt, cfg.data.template)
        got = exported.apply_chat_template(ex.messages_of(conv), tokenize=False, add_generation_prompt=True)
        assert got == want
    ex.check_template(plain, exported, cfg, conversations())  # the export's own guard agrees


@pytest.mark.parametrize("chat_template", [False, True])
@pytest.mark.parametrize("bos", [False, True])
@pytest.mark.parametrize("system_prompt", [None, SYSTEM])
def test_every_client_gets_the_training_ids_with_one_bos(chat_template, bos, system_prompt):
    """Training's prompt ids (BOS included) from the exported template, as transformers,
    llama-cpp-python's chat completion, llama-server --jinja and Ollama each tokenize it. A
    tokenizer that adds BOS (Gemma, Llama) gets `{{ bos_token }}` at the template's start: the
    demo export answered "주택: 주택" in llama-cpp-python without it."""
    tok = make_tokenizer(chat_template=chat_template, bos=bos)
    cfg = config(system_prompt)
    kind, template = ex.export_template(tok, cfg)
    with_bos = ex.training_bos(tok, cfg)
    assert with_bos == (bos and not chat_template)  # a chat template renders its own specials
    assert template.startswith("{{ bos_token }}") == with_bos
    exported = make_tokenizer(chat_template=chat_template, bos=bos)
    exported.chat_template = template
    ex.check_template(tok, exported, cfg, conversations())
    meta = {"chat_template": template, "bos_id": tok.bos_token_id, "add_bos": with_bos}
    for conv in conversations():
        want = encode_prompt(tok, conv, cfg.data.system_prompt, cfg.data.template)
        assert want.count(tok.bos_token_id) == int(with_bos) and (want[0] == tok.bos_token_id) == with_bos
        clients = ex.client_prompt_ids(meta, exported, conv)
        assert sorted(clients) == ["llama-cpp-python", "llama-server", "ollama", "transformers"]
        for client, ids in clients.items():
            assert ids == want, client


def test_a_gguf_that_adds_bos_where_training_did_not_is_caught():
    """llama-server and Ollama add BOS when the GGUF says so; the round trip's client ids see it."""
    tok = make_tokenizer(chat_template=True)
    cfg = config()
    _, template = ex.export_template(tok, cfg)
    conv = conversations()[0]
    clients = ex.client_prompt_ids({"chat_template": template, "bos_id": tok.bos_token_id, "add_bos": True}, tok, conv)
    want = encode_prompt(tok, conv)
    assert clients["llama-cpp-python"] == want and clients["transformers"] == want
    assert clients["llama-server"] == clients["ollama"] == [tok.bos_token_id] + want


@pytest.mark.parametrize("value", [False, True])
def test_a_gguf_bool_is_rewritten_in_place(tmp_path, value):
    """The export sets the GGUF's add_bos_token to what training did (llama-server and Ollama obey it)."""
    import gguf

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_bool("tokenizer.ggml.add_bos_token", not value)
    w.add_string("tokenizer.ggml.pre", "gpt-2")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert ex.gguf_metadata(path)["add_bos"] is (not value)
    assert ex.set_gguf_bool(path, "tokenizer.ggml.add_bos_token", value)
    meta = ex.gguf_metadata(path)
    assert meta["add_bos"] is value and meta["pre"] == "gpt-2"
    assert not ex.set_gguf_bool(path, "tokenizer.ggml.add_eos_token", True)  # absent: nothing written


def test_template_fallback_forced_on_a_chat_model():
    chat = make_tokenizer(chat_template=True)
    kind, _ = ex.export_template(chat, config(template="fallback"))
    assert kind == "kolora-fallback"


@pytest.mark.parametrize("system_prompt", [None, SYSTEM])
def test_model_template_keeps_the_run_system_prompt(system_prompt):
    chat = make_tokenizer(chat_template=True)
    cfg = config(system_prompt)
    kind, template = ex.export_template(chat, cfg)
    assert kind == "model"
    assert (template == chat.chat_template) == (system_prompt is None)
    exported = make_tokenizer(chat_template=True)
    exported.chat_template = template
    for conv in conversations():
        assert exported.apply_chat_template(ex.messages_of(conv), tokenize=False, add_generation_prompt=True) \
            == render_prompt(chat, conv, cfg.data.system_prompt, cfg.data.template)


def test_template_guard_catches_a_wrong_template():
    plain = make_tokenizer(chat_template=False)
    wrong = make_tokenizer(chat_template=False)
    wrong.chat_template = ex.fallback_jinja(None).replace("### 답변:", "### 대답:")
    with pytest.raises(KoloraError, match="renders"):
        ex.check_template(plain, wrong, config(), conversations())


GO_RENDER = r"""
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct{ Role, Content string }

type Case struct {
	Template string
	System   string
	Messages []Message
}

// What Ollama does before executing a template with .Messages: the Modelfile SYSTEM becomes the
// first message when the request has none; consecutive messages of one role are merged.
func collate(msgs []Message) (string, []*Message) {
	var system []string
	var out []*Message
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if len(out) > 0 && out[len(out)-1].Role == msgs[i].Role {
			out[len(out)-1].Content += "\n\n" + msgs[i].Content
		} else {
			out = append(out, &msgs[i])
		}
	}
	return strings.Join(system, "\n\n"), out
}

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	var outs []string
	for _, c := range cases {
		msgs := c.Messages
		if c.System != "" && (len(msgs) == 0 || msgs[0].Role != "system") {
			msgs = append([]Message{{"system", c.System}}, msgs...)
		}
		system, collated := collate(msgs)
		var b strings.Builder
		t := template.Must(template.New("").Parse(c.Template))
		if err := t.Execute(&b, map[string]any{"System": system, "Messages": collated}); err != nil {
			panic(err)
		}
		outs = append(outs, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(outs)
}
"""


def parse_modelfile(text: str) -> dict:
    """TEMPLATE / SYSTEM values and stop parameters of a Modelfile."""
    out: dict = {"stop": [], "parameters": {}}
    for key in ("TEMPLATE", "SYSTEM"):
        start = text.find(f'{key} """')
        if start >= 0:
            start += len(key) + 4
            out[key] = text[start:text.index('"""', start)]
    for line in text.splitlines():
        if line.startswith("PARAMETER stop "):
            out["stop"].append(json.loads(line[len("PARAMETER stop "):]))
        elif line.startswith("PARAMETER "):
            _, key, value = line.split(" ", 2)
            out["parameters"][key] = value
    return out


@pytest.mark.parametrize("chat_template, system_prompt", [(False, None), (False, SYSTEM), (True, None), (True, SYSTEM)])
def test_modelfile_template_renders_the_training_prompt_in_go(tmp_path, chat_template, system_prompt):
    """The Modelfile's TEMPLATE executed by Go's text/template the way Ollama does equals the
    training prompt."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("Go is not installed (Debian: apt-get install golang-go); Ollama templates are Go templates")
    from kolora.generation import GenConfig

    tok = make_tokenizer(chat_template=chat_template)
    cfg = config(system_prompt)
    kind, _ = ex.export_template(tok, cfg)
    text, _ = ex.modelfile("m.gguf", kind, tok, cfg, GenConfig())
    parsed = parse_modelfile(text)
    assert tok.eos_token in parsed["stop"]
    # sampling as `kolora chat` answers; Ollama's own default repeat_penalty (1.1) would change answers
    chat = GenConfig()
    assert {k: float(v) for k, v in parsed["parameters"].items()} == {
        "temperature": chat.temperature, "top_p": chat.top_p, "repeat_penalty": chat.repetition_penalty,
        "num_predict": chat.max_new_tokens}
    assert chat.repetition_penalty == 1.0
    cases = [{"Template": parsed["TEMPLATE"], "System": parsed.get("SYSTEM", ""),
              "Messages": [{"Role": m["role"], "Content": m["content"]} for m in ex.messages_of(conv)]}
             for conv in conversations()]
    (tmp_path / "render.go").write_text(GO_RENDER)
    r = subprocess.run([go, "run", str(tmp_path / "render.go")], input=json.dumps(cases), capture_output=True,
                       text=True, timeout=300, cwd=tmp_path, env={"HOME": str(tmp_path), "GOCACHE": str(tmp_path / "c"),
                                                                   "PATH": "/usr/bin:/bin", "GO111MODULE": "off"})
    assert r.returncode == 0, r.stderr
    for conv, got in zip(conversations(), json.loads(r.stdout)):
        assert got == render_prompt(tok, conv, cfg.data.system_prompt, cfg.data.template)


def test_chatml_default_system_prompt_is_found():
    tok = make_tokenizer(chat_template=True)
    assert ex.chatml_default_system(tok) is None
    tok.chat_template = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nBe kind.<|im_end|>\n{% endif %}"
                         + tok.chat_template)
    assert ex.chatml_default_system(tok) == "Be kind."


# --------------------------------------------------------------------------- end to end
def previous_export(out: Path, gguf: str) -> dict[str, bytes]:
    """A folder as an earlier `kolora export` left it; returns its files' contents."""
    out.mkdir(parents=True)
    (out / gguf).write_bytes(b"GGUF previous")
    (out / "Modelfile").write_text(f"FROM ./{gguf}\n")
    (out / "convert.log").write_text("ok\n")
    (out / "kolora-export.json").write_text(json.dumps(
        {"gguf": gguf, "ok": True, "files": [gguf, "Modelfile", "convert.log", "kolora-export.json"]}))
    return {p.name: p.read_bytes() for p in out.iterdir()}


def gguf_matches_adapter(run: Path, gguf: Path, cfg_tolerance: float) -> float:
    """Independent of the export's own check: the GGUF (read by transformers) against the adapter model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kolora.generation import load_tuned
    from kolora.runs import open_run

    run_obj = open_run(str(run))
    model, tokenizer, cfg = load_tuned(run_obj, dtype="float32")
    ids = encode_prompt(tokenizer, Example("전세권의 존속기간은 얼마인가요?", ""), cfg.data.system_prompt,
                        cfg.data.template)
    meta = ex.gguf_metadata(gguf)
    config_kwargs = {}
    if meta["arch"] == "gpt2":
        from transformers import AutoConfig

        conf = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        conf.n_positions = conf.n_ctx
        config_kwargs["config"] = conf
    back = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                **config_kwargs).eval()
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0, -1]
        got = back(input_ids=torch.tensor([ids])).logits[0, -1]
    assert int(want.argmax()) == int(got.argmax())
    gtok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert gtok.eos_token_id == tokenizer.eos_token_id
    return float((want - got).abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("arch, quant", [("llama", "q8_0"), ("gemma3", "f16"), ("llama-chat", "q8_0")])
def test_export_end_to_end(runs, tmp_path, arch, quant):
    run = runs(arch)
    out = tmp_path / "gguf"
    previous_export(out, f"old-{quant}.gguf")
    (out / "notes.txt").write_text("mine")  # --force replaces the files an export listed, nothing else
    r = run_cli("export", str(run), "--format", "gguf", "--quant", quant, "--out", str(out), "--force")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "round trip OK" in r.stdout
    assert (out / "notes.txt").read_text() == "mine" and not (out / f"old-{quant}.gguf").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["gguf"]  # the temp folder was swapped in
    result = json.loads((out / "kolora-export.json").read_text())
    gguf = out / result["gguf"]
    assert gguf.is_file() and gguf.name.endswith(f"-{quant}.gguf") and not (out / "merged").exists()
    rt = result["round_trip"]
    assert rt["checked"] and rt["ok"] and rt["same_next_token"] and rt["prompt_ids_match"]
    assert rt["max_logit_diff"] <= ex.TOLERANCE[quant] and rt["prompts"] >= 4

    meta = ex.gguf_metadata(gguf)
    assert meta["arch"] == ("gemma3" if arch == "gemma3" else "llama")
    assert meta["file_type"] == {"f16": 1, "q8_0": 7}[quant]  # llama.cpp's LlamaFileType
    plain = arch != "llama-chat"
    assert result["chat_template"] == ("kolora-fallback" if plain else "model")
    assert ("### 질문:" in meta["chat_template"]) == plain

    modelfile = parse_modelfile((out / "Modelfile").read_text())
    assert (out / "Modelfile").read_text().startswith("#") and f"FROM ./{gguf.name}" in (out / "Modelfile").read_text()
    if plain:
        assert modelfile["TEMPLATE"].endswith("### 답변:\n") and "</s>" in modelfile["stop"]
    else:
        assert "<|im_start|>assistant\n" in modelfile["TEMPLATE"] and "<|im_end|>" in modelfile["stop"]

    diff = gguf_matches_adapter(run, gguf, ex.TOLERANCE[quant])
    assert diff <= ex.TOLERANCE[quant]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "phi"])
def test_export_other_architectures(runs, tmp_path, arch):
    """GPT-2 converts (kolora restores the `n_ctx` transformers 5 no longer saves) and reads back;
    Phi converts, but transformers cannot read phi2 GGUFs, so the round trip is reported as not run."""
    run = runs(arch)
    out = tmp_path / "gguf"
    r = run_cli("export", str(run), "--quant", "f16", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((out / "kolora-export.json").read_text())
    if arch == "gpt2":
        assert result["round_trip"]["ok"] and result["arch"] == "gpt2"
        assert gguf_matches_adapter(run, out / result["gguf"], ex.TOLERANCE["f16"]) <= ex.TOLERANCE["f16"]
    else:
        assert result["arch"] == "phi2" and result["round_trip"]["checked"] is False
        assert "logit round trip NOT checked" in r.stderr and result["round_trip"]["ok"]


def test_export_fails_loudly_when_the_gguf_is_off(runs, tmp_path, monkeypatch):
    """A round trip outside the tolerance is an error, with the figures kept in kolora-export.json."""
    monkeypatch.setitem(ex.TOLERANCE, "q8_0", 1e-9)
    out = tmp_path / "off"
    with pytest.raises(KoloraError, match="does not answer like the merged model"):
        ex.export(str(runs("llama")), str(out), quant="q8_0")
    result = json.loads((out / "kolora-export.json").read_text())
    assert result["ok"] is False and result["round_trip"]["max_logit_diff"] > 1e-9


def test_export_refuses_a_non_empty_out_and_bad_flags(runs, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = run_cli("export", str(runs("llama")), "--out", str(out))
    assert r.returncode == 2 and "not empty" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("export", str(runs("llama")), "--out", str(tmp_path / "x"), "--quant", "q4_k")
    assert r.returncode == 2 and "--quant" in r.stderr
    r = run_cli("export", str(tmp_path / "nope"), "--out", str(tmp_path / "y"))
    assert r.returncode == 2 and "run directory not found" in r.stderr


def test_export_force_refuses_a_folder_it_did_not_write(runs, tmp_path):
    """--force used to delete every *-q8_0.gguf, *-f16.gguf and merged/ in --out, whoever wrote them."""
    out = tmp_path / "models"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "llama-3-8b-q8_0.gguf").write_text("downloaded, not exported")
    (out / "merged").mkdir()
    (out / "merged" / "config.json").write_text("{}")
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(KoloraError) as caught:
        ex.export(str(runs("llama")), str(out), force=True)
    assert str(out) in str(caught.value) and "kolora-export.json" in caught.value.one_line()
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("failure", ["converter fails", "disk full"])
def test_a_failed_export_keeps_the_previous_one_and_no_temp_folder(runs, tmp_path, monkeypatch, failure):
    """--force used to delete the previous export first; a failure then left neither it nor a usable
    new one, plus a float32 merged/ and a partial GGUF."""
    out = tmp_path / "gguf"
    before = previous_export(out, "run-llama-q8_0.gguf")

    def convert(merged, gguf_path, quant, log_path, timeout=None):
        gguf_path.write_bytes(b"GGUF partial")
        log_path.write_text("Traceback …\nValueError: boom\n")
        if failure == "disk full":
            raise OSError(28, "No space left on device")
        raise KoloraError("llama.cpp's converter failed: ValueError: boom", f"full converter output in {log_path}")

    monkeypatch.setattr(ex, "convert", convert)
    with pytest.raises(KoloraError) as caught:
        ex.export(str(runs("llama")), str(out), force=True)
    assert ("converter failed" if failure == "converter fails" else "disk full") in str(caught.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["gguf"]  # no temp folder, no merged/ beside it
    if failure == "converter fails":  # the log the error points to outlives the temp folder
        log = caught.value.hint.split("full converter output in ")[-1]
        assert "boom" in Path(log).read_text()
        Path(log).unlink()


def test_converter_timeout_is_a_clear_error(tmp_path):
    from conftest import build_tiny

    model = build_tiny(tmp_path / "m", "llama")
    with pytest.raises(KoloraError, match="did not finish within") as caught:
        ex.convert(model, tmp_path / "m.gguf", "f16", tmp_path / "convert.log", timeout=0.01)
    assert "--convert-timeout" in caught.value.one_line()


def test_unknown_tokenizer_fails_with_a_clear_message(tmp_path):
    """A pre-tokenizer that is neither known to llama.cpp nor GPT-2's regex: llama.cpp refuses, and
    kolora says why in one line."""
    from conftest import build_tiny

    model = build_tiny(tmp_path / "m", "llama")
    spec = json.loads((model / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (model / "tokenizer.json").write_text(json.dumps(spec))
    assert not ex.gpt2_pretokenizer(model)
    with pytest.raises(KoloraError, match="converter failed") as caught:
        ex.convert(model, tmp_path / "m.gguf", "f16", tmp_path / "convert.log")
    assert "pre-tokenizer" in caught.value.one_line() and (tmp_path / "convert.log").is_file()
