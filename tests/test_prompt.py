from conftest import make_tokenizer

from kolora.data import Example
from kolora.prompt import IGNORE, encode_example, encode_prompt, render_prompt

EX = Example("전세권의 존속기간은?", "민법 제312조 제1항에 따라 10년을 넘지 못합니다.")


def test_fallback_template_is_documented_format():
    tok = make_tokenizer()
    text = render_prompt(tok, EX)
    assert text == "### 질문:\n전세권의 존속기간은?\n\n### 답변:\n"
    assert render_prompt(tok, EX, system_prompt="법률 도우미").startswith("법률 도우미\n\n### 질문:")


def test_loss_covers_answer_and_eos_only():
    tok = make_tokenizer()
    ids, labels = encode_example(tok, EX)
    prompt = encode_prompt(tok, EX)
    assert ids[:len(prompt)] == prompt  # inference sees exactly the training prefix
    assert all(x == IGNORE for x in labels[:len(prompt)])
    assert labels[len(prompt):] == ids[len(prompt):]
    assert ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id
    answer = tok.decode([x for x in labels if x != IGNORE], skip_special_tokens=True)
    assert answer == EX.answer


def test_pad_equal_to_eos_keeps_the_eos_label():
    tok = make_tokenizer(chat_template=True)
    assert tok.pad_token_id == tok.eos_token_id  # the SmolLM2 situation
    ids, labels = encode_example(tok, EX)
    assert labels[-1] == tok.eos_token_id  # masking by id would have removed it


def test_chat_template_used_without_double_bos():
    tok = make_tokenizer(chat_template=True)
    text = render_prompt(tok, EX, system_prompt="도우미")
    assert text.startswith("<|im_start|>system\n도우미<|im_end|>") and text.endswith("<|im_start|>assistant\n")
    prompt = encode_prompt(tok, EX)
    assert prompt.count(tok.bos_token_id) <= 1
    assert render_prompt(tok, EX, template="fallback").startswith("### 질문:")


def test_history_is_rendered_in_order():
    tok = make_tokenizer()
    ex = Example("두 번째 질문", "답", history=[{"role": "user", "content": "첫 질문"},
                                             {"role": "assistant", "content": "첫 답"}])
    text = render_prompt(tok, ex)
    assert text.index("첫 질문") < text.index("첫 답") < text.index("두 번째 질문")
