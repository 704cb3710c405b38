"""Ollama's TEMPLATE: recognised from what each family's chat template renders, run through an interpreter
of Go's text/template (tests/helpers/go_template.py) as Ollama fills it, and compared with the Jinja
template's own text; unknown templates are refused in one line."""

from __future__ import annotations

import pytest

from peftkit.export.chat_format import recognise_chat_format
from peftkit.export.modelfile import modelfile_text, ollama_template, prompt_template_parts, stop_tokens
from peftkit.export.vocabulary import read_vocabulary
from peftkit.foundation.errors import UsageError

from helpers.go_template import render_ollama
from helpers.tiny_families import FAMILIES, GEMMA

CONVERSATIONS = (
    [{"role": "user", "content": "Hi there"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello {{ there }}!"},
        {"role": "user", "content": "Bye"},
    ],
)
EXPECTED_FAMILY = {
    "llama": ("ChatML", "turn"),
    "llama3": ("Llama 3", "turn"),
    "mistral": ("Mistral", "last_user"),
    "qwen2": ("ChatML", "turn"),
    "gemma2": ("Gemma", "first_user"),
    "phi3": ("Phi-3", "turn"),
}


def _hf_text(tokenizer, messages, adds_bos: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    return text[len(bos) :] if adds_bos and bos and text.startswith(bos) else text  # Ollama's runner adds BOS


@pytest.fixture(scope="module")
def tokenizers():
    return {family.name: family.tokenizer() for family in FAMILIES if family.name in EXPECTED_FAMILY}


@pytest.mark.parametrize("name", EXPECTED_FAMILY)
def test_the_ollama_template_renders_what_the_chat_template_renders(name, tokenizers) -> None:
    tokenizer = tokenizers[name]
    adds_bos = read_vocabulary(tokenizer, len(tokenizer)).add_bos
    chat = recognise_chat_format(tokenizer, adds_bos)
    assert (chat.family, chat.system_mode) == EXPECTED_FAMILY[name]
    template = ollama_template(chat)
    for messages in CONVERSATIONS:
        assert render_ollama(template, messages) == _hf_text(tokenizer, messages, adds_bos)


@pytest.mark.slow
def test_smollm2s_default_system_prompt_is_kept_and_the_runs_replaces_it() -> None:
    from peftkit.models import load_model

    _, tokenizer = load_model()
    chat = recognise_chat_format(tokenizer, adds_bos=False)
    assert chat.family == "ChatML" and chat.default_system.startswith(
        "You are a helpful AI assistant named SmolLM"
    )
    template = ollama_template(chat)
    for messages in CONVERSATIONS:
        assert render_ollama(template, messages) == _hf_text(tokenizer, messages, False)
    run = [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Ada"}]
    assert render_ollama(template, run[1:], modelfile_system="Answer in JSON.") == _hf_text(
        tokenizer, run, False
    )


def test_the_runs_prompt_template_wraps_each_user_message(tokenizers) -> None:
    tokenizer = tokenizers["qwen2"]
    chat = recognise_chat_format(tokenizer, False)
    template = ollama_template(chat, "Extract the fields of {text} as JSON.")
    wrapped = [{"role": "user", "content": "Extract the fields of Ada, 36 as JSON."}]
    assert render_ollama(template, [{"role": "user", "content": "Ada, 36"}]) == _hf_text(
        tokenizer, wrapped, False
    )
    assert prompt_template_parts("{{literal}} {x}!") == ("{literal} ", "!")
    assert prompt_template_parts("no field") == ("", "")


def test_the_modelfile_names_the_file_stop_tokens_and_system_prompt(tokenizers) -> None:
    tokenizer = tokenizers["gemma2"]
    chat = recognise_chat_format(tokenizer, True)
    text = modelfile_text("model.gguf", chat, tokenizer, "Answer in JSON.", None)
    assert text.splitlines()[1] == "FROM ./model.gguf"
    assert 'PARAMETER stop "<end_of_turn>"' in text
    assert 'SYSTEM """Answer in JSON."""' in text
    assert f'TEMPLATE """{ollama_template(chat)}"""' in text
    assert stop_tokens(recognise_chat_format(tokenizers["llama3"], True), tokenizers["llama3"]) == [
        "<|eot_id|>"
    ]


@pytest.mark.parametrize(
    "template",
    [
        "{% for m in messages %}{{ m['role'].upper() + ': ' + m['content'] + '\n' }}{% endfor %}ASSISTANT:",
        "{% for m in messages %}{{ m['content'] }}{% endfor %}",
        None,
    ],
    ids=["vicuna-like", "bare", "none"],
)
def test_unknown_templates_are_refused_in_one_line(template, tokenizers) -> None:
    tokenizer = tokenizers["qwen2"]
    tokenizer.chat_template = template
    with pytest.raises(UsageError) as error:
        recognise_chat_format(tokenizer, False)
    assert "\n" not in str(error.value) and "ChatML" in str(error.value)


def test_a_template_that_refuses_system_messages_gets_none(tokenizers) -> None:
    tokenizer = tokenizers["gemma2"]
    refusal = "{{ raise_exception('System role not supported') }}"
    tokenizer.chat_template = "{% if messages[0]['role'] == 'system' %}" + refusal + "{% endif %}" + GEMMA
    chat = recognise_chat_format(tokenizer, True)
    assert (chat.family, chat.system_mode) == ("Gemma", "none")
    assert render_ollama(ollama_template(chat), [CONVERSATIONS[0][0]]) == _hf_text(
        tokenizer, CONVERSATIONS[0], True
    )


def test_the_go_interpreter_follows_go_semantics() -> None:
    """The interpreter the tests above rely on, on templates whose Go output is known."""
    template = (
        "{{ if .System }}[{{ .System }}]{{ else }}none{{ end }}{{ range $i, $_ := .Messages }}"
        '{{ if eq .Role "user" }}{{ $i }}{{ if and $.System (eq (len (slice $.Messages $i)) 1) }}*{{ end }}'
        '{{ else if eq .Role "assistant" }}a{{ end }}{{ end }}{{ "{{" }}'
    )
    messages = [
        {"role": "user", "content": "x"},
        {"role": "user", "content": "y"},
        {"role": "assistant", "content": "z"},
    ]
    assert render_ollama(template, messages) == "none0a{{"  # consecutive user messages merge into one
    assert render_ollama(template, messages[:1], modelfile_system="S") == "[S]1*{{"
