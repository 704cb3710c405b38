"""What a model's chat template renders, recognised from the template's own output.

The Jinja template is rendered on three probe conversations with marker strings for the messages;
the text between the markers gives the pieces of the format (what comes before a user message, after
it, around an assistant message, where a system message goes). The format is accepted only when the
user marker is a known family's (ChatML, Llama 3, Mistral, Gemma, Phi-3) and re-rendering the probes
from the pieces gives the template's text back exactly; anything else is refused rather than guessed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peftkit.foundation.errors import UsageError

__all__ = ["FAMILIES", "ChatFormat", "recognise_chat_format"]

# family → the text before a user message's content (the variants each family's templates use)
FAMILIES: dict[str, tuple[str, ...]] = {
    "ChatML": ("<|im_start|>user\n",),
    "Llama 3": ("<|start_header_id|>user<|end_header_id|>\n\n",),
    "Mistral": ("[INST] ", "[INST]"),
    "Gemma": ("<start_of_turn>user\n",),
    "Phi-3": ("<|user|>\n",),
}
_USER_1, _ASSISTANT_1, _USER_2, _SYSTEM = "QqUser1qQ", "QqAssistant1qQ", "QqUser2qQ", "QqSystemqQ"


@dataclass(frozen=True)
class ChatFormat:
    """A chat format as pieces of text: a conversation renders as ``start`` + (``system`` block) + for
    each user message ``user_prefix`` + content + ``generation_prompt``, for each assistant message
    ``assistant_prefix`` + content + ``assistant_suffix``.

    Attributes:
        family: the recognised family ("ChatML" …).
        start: text the template puts first (a BOS token the tokenizer does not add itself).
        user_prefix, generation_prompt, assistant_prefix, assistant_suffix: as above.
        system_mode: ``"turn"`` (its own block), ``"first_user"`` / ``"last_user"`` (put before that
            user message's content, then ``system_separator``), or ``"none"`` (the template refuses one).
        system_prefix, system_suffix: around a ``"turn"`` system message.
        system_separator: between the system text and the user text in the other modes.
        default_system: what a ``"turn"`` template writes when there is no system message (None: no block).
    """

    family: str
    start: str
    user_prefix: str
    generation_prompt: str
    assistant_prefix: str
    assistant_suffix: str
    system_mode: str
    system_prefix: str = ""
    system_suffix: str = ""
    system_separator: str = ""
    default_system: str | None = None

    def render(self, messages: list[dict[str, str]]) -> str:
        """The text of ``messages`` (an optional leading system message, then user/assistant turns) with
        the generation prompt, as the pieces define it."""
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
        turns = messages[1:] if system is not None else messages
        users = [i for i, m in enumerate(turns) if m["role"] == "user"]
        text = self.start
        if self.system_mode == "turn" and (system is not None or self.default_system is not None):
            text += (
                self.system_prefix
                + (system if system is not None else self.default_system)
                + self.system_suffix
            )
        for i, message in enumerate(turns):
            if message["role"] == "user":
                content = message["content"]
                joined = (
                    system is not None and users and i == users[0 if self.system_mode == "first_user" else -1]
                )
                if joined and self.system_mode in ("first_user", "last_user"):
                    content = system + self.system_separator + content
                text += self.user_prefix + content + self.generation_prompt
            else:
                text += self.assistant_prefix + message["content"] + self.assistant_suffix
        return text


def _render(tokenizer: Any, messages: list[dict[str, str]], bos: str) -> str | None:
    """The template's text for ``messages`` with the generation prompt, ``bos`` removed from its start."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template may refuse a conversation (e.g. Gemma 2 refuses system messages)
        return None
    return text[len(bos) :] if bos and text.startswith(bos) else text


def _conversation(system: bool = False) -> list[dict[str, str]]:
    head = [{"role": "system", "content": _SYSTEM}] if system else []
    return [
        *head,
        {"role": "user", "content": _USER_1},
        {"role": "assistant", "content": _ASSISTANT_1},
        {"role": "user", "content": _USER_2},
    ]


def recognise_chat_format(tokenizer: Any, adds_bos: bool) -> ChatFormat:
    """The :class:`ChatFormat` of ``tokenizer``'s chat template.

    Args:
        tokenizer: a Hugging Face tokenizer with ``chat_template``.
        adds_bos: the tokenizer puts BOS before encoded text itself; a BOS the template writes first is
            then left to the tokenizer (as llama.cpp and Ollama do), else it is part of the text.

    Raises:
        UsageError: no chat template, or one that renders no known family exactly.
    """
    supported = ", ".join(FAMILIES)
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"the model has no chat template; an Ollama Modelfile needs one ({supported})")
    bos = tokenizer.bos_token or ""
    raw = _render(tokenizer, _conversation(), "")
    bos = bos if raw is not None and bos and raw.startswith(bos) else ""
    plain = _render(tokenizer, _conversation(), bos)
    pieces = _split(plain, [_USER_1, _ASSISTANT_1, _USER_2]) if plain is not None else None
    found = _pieces_format(pieces) if pieces else None
    if found is None:
        raise UsageError(
            f"the chat template is not one peftkit recognises ({supported}); not guessing an Ollama TEMPLATE"
        )
    found = _with_system(found, _render(tokenizer, _conversation(system=True), bos), plain)
    probes = (_conversation(), _conversation(system=True), [{"role": "user", "content": _USER_1}])
    for probe in probes:
        expected = _render(tokenizer, probe, bos)
        if expected is not None and found.render(probe) != expected:
            raise UsageError(
                f"the chat template looks like {found.family} but renders differently; "
                "not guessing an Ollama TEMPLATE"
            )
    return found if adds_bos or not bos else _replace(found, start=bos + found.start)


def _split(text: str, markers: list[str]) -> list[str] | None:
    """The text before, between and after ``markers`` (each exactly once, in order), or None."""
    pieces, rest = [], text
    for marker in markers:
        if text.count(marker) != 1 or marker not in rest:
            return None
        before, rest = rest.split(marker, 1)
        pieces.append(before)
    return [*pieces, rest]


def _pieces_format(pieces: list[str]) -> ChatFormat | None:
    head, after_user, after_assistant, generation = pieces
    for family, prefixes in FAMILIES.items():
        for prefix in prefixes:
            if (
                head.endswith(prefix)
                and after_assistant.endswith(prefix)
                and after_user.startswith(generation)
            ):
                return ChatFormat(
                    family=family,
                    start=head[: -len(prefix)],  # a default system block, for now
                    user_prefix=prefix,
                    generation_prompt=generation,
                    assistant_prefix=after_user[len(generation) :],
                    assistant_suffix=after_assistant[: -len(prefix)],
                    system_mode="none",
                )
    return None


def _with_system(found: ChatFormat, with_system: str | None, plain: str) -> ChatFormat:
    """``found`` with its system handling, read from the probe with a system message (None: refused)."""
    head = found.start
    found = _replace(found, start="")
    if with_system is None or _SYSTEM not in with_system:
        return found if not head else _replace(found, start=head)
    before, _, after = with_system.partition(_SYSTEM)
    for mode, marker in (("first_user", _USER_1), ("last_user", _USER_2)):
        at = after.find(marker)
        if at >= 0 and before + after[at:] == plain:
            return _replace(found, start=head, system_mode=mode, system_separator=after[:at])
    rest = plain[len(head) :]
    if not with_system.endswith(rest):
        return _replace(found, start=head)
    system_prefix, system_suffix = before, after[: len(after) - len(rest)]
    default = None
    if head:
        if not (head.startswith(system_prefix) and head.endswith(system_suffix)):
            return _replace(found, start=head)
        default = head[len(system_prefix) : len(head) - len(system_suffix)]
    return _replace(
        found,
        system_mode="turn",
        system_prefix=system_prefix,
        system_suffix=system_suffix,
        default_system=default,
    )


def _replace(found: ChatFormat, **changes: Any) -> ChatFormat:
    return ChatFormat(**{**found.__dict__, **changes})
