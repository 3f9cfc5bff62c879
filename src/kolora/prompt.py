"""The one prompt format used by training, chat and evaluation.

With a chat template (SmolLM2, TinyLlama-Chat, …) the prompt is the template rendered up to
the assistant's turn. Without one (Gemma-3-270m base, GPT-2, KoGPT-2, Phi-2) kolora uses
this documented fallback:

    {system}            <- only when a system prompt is set
                        <-
    ### 참고 조문:        <- only with retrieved passages (retrieval.corpus)
    {passages}
                        <-
    ### 질문:
    {question}

    ### 답변:
    {answer}<eos>

Prompt and answer are tokenized separately and concatenated, so the ids the model sees at
inference (the prompt alone) are exactly the ids it was trained on — a response marker can
never tokenize differently inside the text (TRL#980). The loss covers the answer and the EOS
only; labels are built from positions, never by comparing ids with the pad id (SmolLM2's pad
is its EOS, and masking it would teach the model never to stop).
"""

from __future__ import annotations

from .data import Example

IGNORE = -100
Q_MARK, A_MARK = "### 질문:", "### 답변:"
CONTEXT_MARK = "### 참고 조문:"


def user_text(ex: Example) -> str:
    """The user's turn: the question, after the retrieved passages when there are any. With a
    chat template this is the user message; the fallback template lays out the same parts."""
    if not ex.context:
        return ex.question
    return f"{CONTEXT_MARK}\n{ex.context}\n\n{Q_MARK}\n{ex.question}"


def uses_chat_template(tokenizer, template: str = "auto") -> bool:
    return template == "auto" and bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer, ex: Example, system_prompt: str | None = None, template: str = "auto") -> str:
    """The text the model sees before its answer."""
    system = ex.system or system_prompt
    if uses_chat_template(tokenizer, template):
        messages = ([{"role": "system", "content": system}] if system else []) + list(ex.history)
        messages.append({"role": "user", "content": user_text(ex)})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    parts = [system, ""] if system else []
    for turn in ex.history:
        mark = Q_MARK if turn["role"] == "user" else A_MARK
        parts += [mark, turn["content"], ""]
    if ex.context:
        parts += [CONTEXT_MARK, ex.context, ""]
    parts += [Q_MARK, ex.question, "", A_MARK, ""]
    return "\n".join(parts)


def encode_prompt(tokenizer, ex: Example, system_prompt: str | None = None, template: str = "auto") -> list[int]:
    text = render_prompt(tokenizer, ex, system_prompt, template)
    # A rendered chat template already carries BOS; adding special tokens again would double it.
    add_special = not uses_chat_template(tokenizer, template)
    return tokenizer(text, add_special_tokens=add_special).input_ids


def encode_example(tokenizer, ex: Example, system_prompt: str | None = None,
                   template: str = "auto") -> tuple[list[int], list[int]]:
    """(input_ids, labels) with labels = IGNORE on the prompt, answer ids + EOS after it."""
    prompt = encode_prompt(tokenizer, ex, system_prompt, template)
    answer = tokenizer(ex.answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return prompt + answer, [IGNORE] * len(prompt) + answer
