"""An Ollama Modelfile for an exported GGUF: ``FROM``, a ``TEMPLATE`` in Ollama's Go-template syntax that
renders what the model's chat template renders, ``PARAMETER stop`` for its end-of-turn tokens, and the
run's ``SYSTEM`` prompt.

Ollama fills the template with ``.System`` (the system messages, or the Modelfile's ``SYSTEM`` when the
request has none) and ``.Messages`` (every message, system ones included, so the loop skips them); a
generation request ends with a user message, after which the template writes the generation prompt.
"""

from __future__ import annotations

import string
from typing import Any

from peftkit.export.chat_format import ChatFormat
from peftkit.foundation.errors import UsageError

__all__ = ["modelfile_text", "ollama_template", "prompt_template_parts", "stop_tokens"]


def _literal(text: str) -> str:
    """``text`` as literal Go-template text: ``{{`` cannot appear as itself."""
    return text.replace("{{", '{{ "{{" }}')


def prompt_template_parts(prompt_template: str | None) -> tuple[str, str]:
    """``(before, after)`` the one field of a run's ``prompt_template`` (``("", "")`` without one), the
    text ``peftkit generate`` puts around the user's input."""
    if not prompt_template:
        return "", ""
    fields = {name for _, name, _, _ in string.Formatter().parse(prompt_template) if name}
    if len(fields) != 1:
        return "", ""
    marker = "\x00peftkit-input\x00"
    before, after = prompt_template.format(**{fields.pop(): marker}).split(marker, 1)
    return before, after


def ollama_template(chat: ChatFormat, prompt_template: str | None = None) -> str:
    """The Go template that renders conversations as ``chat`` does; user messages are wrapped in the run's
    ``prompt_template`` (as ``peftkit generate`` wraps its input)."""
    before, after = (_literal(part) for part in prompt_template_parts(prompt_template))
    system = ""
    if chat.system_mode == "turn":
        prefix, suffix = _literal(chat.system_prefix), _literal(chat.system_suffix)
        if chat.default_system is None:
            system = f"{{{{ if .System }}}}{prefix}{{{{ .System }}}}{suffix}{{{{ end }}}}"
        else:
            default = _literal(chat.default_system)
            system = (
                f"{prefix}{{{{ if .System }}}}{{{{ .System }}}}{{{{ else }}}}{default}{{{{ end }}}}{suffix}"
            )
    joined = ""
    if chat.system_mode == "first_user":  # Ollama puts the system message first: the first user is at 1
        joined = (
            "{{ if and $.System (eq $i 1) }}{{ $.System }}"
            f"{_literal(chat.system_separator)}{{{{ end }}}}"
        )
    elif chat.system_mode == "last_user":
        joined = (
            "{{ if and $.System (eq (len (slice $.Messages $i)) 1) }}{{ $.System }}"
            f"{_literal(chat.system_separator)}{{{{ end }}}}"
        )
    return (
        f"{_literal(chat.start)}{system}{{{{ range $i, $_ := .Messages }}}}"
        f'{{{{ if eq .Role "user" }}}}{_literal(chat.user_prefix)}{joined}{before}{{{{ .Content }}}}{after}'
        f"{_literal(chat.generation_prompt)}"
        f'{{{{ else if eq .Role "assistant" }}}}{_literal(chat.assistant_prefix)}{{{{ .Content }}}}'
        f"{_literal(chat.assistant_suffix)}{{{{ end }}}}{{{{ end }}}}"
    )


def stop_tokens(chat: ChatFormat, tokenizer: Any) -> list[str]:
    """The special tokens that end an assistant turn (those in its suffix; else the EOS token)."""
    specials = sorted(
        {str(t) for t in tokenizer.all_special_tokens} | set(tokenizer.get_added_vocab()), key=len
    )
    found = [token for token in reversed(specials) if token and token in chat.assistant_suffix]
    if not found and tokenizer.eos_token:
        found = [tokenizer.eos_token]
    return found


def _quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise UsageError(f'the {what} contains """, which an Ollama Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile_text(
    gguf_name: str, chat: ChatFormat, tokenizer: Any, system_prompt: str | None, prompt_template: str | None
) -> str:
    """The Modelfile next to ``gguf_name`` (a file name in the same directory)."""
    lines = [
        "# peftkit export: the merged model in Ollama's chat format (ollama create NAME -f Modelfile)",
        f"FROM ./{gguf_name}",
        f"TEMPLATE {_quoted(ollama_template(chat, prompt_template), 'chat template')}",
    ]
    lines += [f'PARAMETER stop "{token}"' for token in stop_tokens(chat, tokenizer)]
    if system_prompt:
        lines.append(f"SYSTEM {_quoted(system_prompt, 'system prompt')}")
    return "\n".join(lines) + "\n"
