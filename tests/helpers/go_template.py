"""A small interpreter of Go's text/template, enough to run the Ollama TEMPLATEs peftkit writes, and
Ollama's way of filling one: ``.System`` (the system messages joined, or the Modelfile's SYSTEM when the
request has none) and ``.Messages`` (all messages, consecutive ones of a role merged).

Supported: literal text; ``{{ PIPE }}``; ``if`` / ``else if`` / ``else`` / ``end``; ``range $i, $x := PIPE``
and ``range PIPE``; commands ``eq``, ``and``, ``or``, ``not``, ``len``, ``slice``; operands ``.Field``,
``$.Field``, ``$var``, ``$``, string and integer literals, parentheses. Anything else raises, so a template
using more than this fails the tests instead of being half-read.
"""

from __future__ import annotations

import re
from typing import Any

_ACTION = re.compile(r"\{\{(.*?)\}\}", re.S)
_TOKEN = re.compile(r'\s*("(?:[^"\\]|\\.)*"|\(|\)|[^\s()]+)')


def _tokens(text: str) -> list[str]:
    return [m.group(1) for m in _TOKEN.finditer(text) if m.group(1).strip()]


def _parse(template: str) -> list[Any]:
    """Nodes: ``("text", s)``, ``("out", tokens)``, ``("if", [(tokens, body)...], else_body)``,
    ``("range", names, tokens, body)``."""
    parts, position = [], 0
    for match in _ACTION.finditer(template):
        parts.append(("text", template[position : match.start()]))
        action = match.group(1)
        if action.startswith("-") or action.endswith("-"):
            raise ValueError("trim markers are not supported")
        parts.append(("action", action.strip()))
        position = match.end()
    parts.append(("text", template[position:]))
    nodes, rest = _block(parts, 0)
    if rest != len(parts):
        raise ValueError("unbalanced end")
    return nodes


def _block(parts: list[tuple[str, str]], i: int) -> tuple[list[Any], int]:
    nodes: list[Any] = []
    while i < len(parts):
        kind, value = parts[i]
        if kind == "text":
            nodes.append(("text", value))
            i += 1
            continue
        words = value.split(None, 1)
        keyword = words[0]
        if keyword in ("end", "else"):
            return nodes, i
        if keyword == "if":
            branches, otherwise = [], []
            condition = _tokens(words[1])
            while True:
                body, i = _block(parts, i + 1)
                branches.append((condition, body))
                action = parts[i][1]
                if action.startswith("else if"):
                    condition = _tokens(action[len("else if") :])
                    continue
                if action == "else":
                    otherwise, i = _block(parts, i + 1)
                break
            nodes.append(("if", branches, otherwise))
            i += 1  # end
        elif keyword == "range":
            head = words[1]
            names: list[str] = []
            if ":=" in head:
                declared, head = head.split(":=", 1)
                names = [name.strip() for name in declared.split(",")]
            body, i = _block(parts, i + 1)
            nodes.append(("range", names, _tokens(head), body))
            i += 1  # end
        else:
            nodes.append(("out", _tokens(value)))
            i += 1
    return nodes, i


def _truthy(value: Any) -> bool:
    return bool(value)


def _operand(tokens: list[str], i: int, dot: Any, variables: dict[str, Any]) -> tuple[Any, int]:
    token = tokens[i]
    if token == "(":
        value, i = _command(tokens, i + 1, dot, variables)
        return value, i + 1  # ")"
    if token.startswith('"'):
        return bytes(token[1:-1], "utf-8").decode("unicode_escape"), i + 1
    if token.isdigit():
        return int(token), i + 1
    if token.startswith("$"):
        name, _, field = token.partition(".")
        value = variables[name]
        return (value[field] if field else value), i + 1
    if token.startswith("."):
        return dot[token[1:]], i + 1
    raise ValueError(f"unsupported operand {token!r}")


def _command(tokens: list[str], i: int, dot: Any, variables: dict[str, Any]) -> tuple[Any, int]:
    functions = {
        "eq": lambda a, b: a == b,
        "and": lambda a, b: b if _truthy(a) else a,
        "or": lambda a, b: a if _truthy(a) else b,
        "not": lambda a: not _truthy(a),
        "len": len,
        "slice": lambda x, start: x[start:],
    }
    if tokens[i] in functions:
        name, i, args = tokens[i], i + 1, []
        while i < len(tokens) and tokens[i] != ")":
            value, i = _operand(tokens, i, dot, variables)
            args.append(value)
        return functions[name](*args), i
    return _operand(tokens, i, dot, variables)


def _evaluate(tokens: list[str], dot: Any, variables: dict[str, Any]) -> Any:
    value, i = _command(tokens, 0, dot, variables)
    if i != len(tokens):
        raise ValueError(f"unparsed {tokens[i:]}")
    return value


def _run(nodes: list[Any], dot: Any, variables: dict[str, Any]) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "out":
            out.append(str(_evaluate(node[1], dot, variables)))
        elif node[0] == "if":
            for condition, body in node[1]:
                if _truthy(_evaluate(condition, dot, variables)):
                    out.append(_run(body, dot, variables))
                    break
            else:
                out.append(_run(node[2], dot, variables))
        else:
            _, names, tokens, body = node
            for index, item in enumerate(_evaluate(tokens, dot, variables)):
                scope = dict(variables)
                if names:
                    scope[names[0]] = index
                    scope[names[-1]] = item
                out.append(_run(body, item, scope))
    return "".join(out)


def render_ollama(template: str, messages: list[dict[str, str]], modelfile_system: str | None = None) -> str:
    """The prompt Ollama builds from ``template`` for a chat request with ``messages``."""
    if modelfile_system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": modelfile_system}, *messages]
    collated: list[dict[str, str]] = []
    for message in messages:
        if collated and collated[-1]["Role"] == message["role"]:
            collated[-1]["Content"] += "\n\n" + message["content"]
        else:
            collated.append({"Role": message["role"], "Content": message["content"]})
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    root = {"System": system, "Messages": collated}
    return _run(_parse(template), root, {"$": root})
