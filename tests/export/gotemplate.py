"""A small interpreter of Go's text/template, for the constructs lorakit's Ollama templates use, to run a
TEMPLATE the way Ollama does: ``.System`` holds the system messages joined by a blank line (or the
Modelfile's SYSTEM when there are none), ``.Messages`` every message (system ones included), each with
``.Role`` and ``.Content``.

Supported: text; ``{{ .X }}``, ``{{ $v }}``, ``{{ $.X }}``; ``{{ $v := EXPR }}`` / ``{{ $v = EXPR }}``;
``{{ if EXPR }} ... {{ else if EXPR }} ... {{ else }} ... {{ end }}``; ``{{ range .Messages }}`` and
``{{ range $i, $_ := .Messages }}``; expressions ``eq A B``, ``and A B``, ``not A``, ``len X``,
``slice X I``, string literals, parentheses. Whitespace trimming (``{{-``) is refused: lorakit writes none.
Variables follow Go's scoping: ``:=`` declares in the current block, ``=`` assigns the nearest declaration.
"""
from __future__ import annotations

import re

_ACTION = re.compile(r"{{(.*?)}}", re.S)


def parse(template: str):
    """A tree: list of ("text", s) | ("out", expr) | ("set", name, expr, declare) | ("if", [(cond, body)], else)
    | ("range", index_var, expr, body)."""
    tokens, pos = [], 0
    for m in _ACTION.finditer(template):
        if m.start() > pos:
            tokens.append(("text", template[pos:m.start()]))
        inner = m.group(1)
        assert not inner.startswith("-") and not inner.endswith("-"), "trim markers are not supported"
        tokens.append(("action", inner.strip()))
        pos = m.end()
    if pos < len(template):
        tokens.append(("text", template[pos:]))
    tree, rest = _block(tokens, 0)
    assert rest == len(tokens), "unbalanced {{ end }}"
    return tree


def _block(tokens, i):
    out = []
    while i < len(tokens):
        kind, value = tokens[i]
        if kind == "text":
            out.append(("text", value))
            i += 1
            continue
        if value == "end" or value == "else" or value.startswith("else if "):
            return out, i
        if value.startswith("if "):
            branches, other = [], None
            cond = value[3:]
            while True:
                body, i = _block(tokens, i + 1)
                branches.append((cond, body))
                closing = tokens[i][1]
                if closing.startswith("else if "):
                    cond = closing[len("else if "):]
                    continue
                if closing == "else":
                    other, i = _block(tokens, i + 1)
                    assert tokens[i][1] == "end"
                break
            out.append(("if", branches, other))
            i += 1
        elif value.startswith("range "):
            spec = value[len("range "):]
            m = re.fullmatch(r"(\$\w+), \$_ := (.+)", spec)
            body, i = _block(tokens, i + 1)
            assert tokens[i][1] == "end"
            out.append(("range", m.group(1) if m else None, m.group(2) if m else spec, body))
            i += 1
        elif re.fullmatch(r"\$\w+ :?= .+", value):
            name, op, expr = value.split(" ", 2)
            out.append(("set", name, expr, op == ":="))
            i += 1
        else:
            out.append(("out", value))
            i += 1
    return out, i


def _split(expr: str) -> list[str]:
    parts, depth, cur, quote = [], 0, "", False
    for ch in expr:
        if ch == '"':
            quote = not quote
        if ch == "(" and not quote:
            depth += 1
        if ch == ")" and not quote:
            depth -= 1
        if ch == " " and depth == 0 and not quote:
            if cur:
                parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + ([cur] if cur else [])


def _value(term: str, dot, root, scopes):
    if term.startswith("("):
        return _eval(term[1:-1], dot, root, scopes)
    if term.startswith('"'):
        return term[1:-1]
    if term.isdigit():
        return int(term)
    if term.startswith("$."):
        return root[term[2:]]
    if term.startswith("$"):
        for scope in reversed(scopes):
            if term in scope:
                return scope[term]
        raise KeyError(f"undefined variable {term}")
    if term.startswith("."):
        return dot[term[1:]]
    raise ValueError(f"unsupported term {term!r}")


def _eval(expr: str, dot, root, scopes):
    words = _split(expr.strip())
    fn, args = words[0], [_value(w, dot, root, scopes) for w in words[1:]]
    if fn == "eq":
        return args[0] == args[1]
    if fn == "ne":
        return args[0] != args[1]
    if fn == "and":
        return args[0] and args[1]
    if fn == "not":
        return not args[0]
    if fn == "len":
        return len(args[0])
    if fn == "slice":
        return args[0][args[1]:]
    assert len(words) == 1, f"unsupported function in {expr!r}"
    return _value(fn, dot, root, scopes)


def _truth(v) -> bool:
    return bool(v)  # Go: false, 0, "", nil, empty slices are false


def _run(nodes, dot, root, scopes, out):
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "out":
            out.append(str(_eval(node[1], dot, root, scopes)))
        elif node[0] == "set":
            _, name, expr, declare = node
            value = _eval(expr, dot, root, scopes)
            if declare:
                scopes[-1][name] = value
            else:
                next(s for s in reversed(scopes) if name in s)[name] = value
        elif node[0] == "if":
            for cond, body in node[1]:
                if _truth(_eval(cond, dot, root, scopes)):
                    _run(body, dot, root, scopes + [{}], out)
                    break
            else:
                if node[2] is not None:
                    _run(node[2], dot, root, scopes + [{}], out)
        elif node[0] == "range":
            _, index, expr, body = node
            for i, item in enumerate(_eval(expr, dot, root, scopes)):
                _run(body, item, root, scopes + [{index: i} if index else {}], out)


def execute(template: str, messages: list[dict], default_system: str | None = None) -> str:
    """The text Ollama's chat sends for ``messages`` through ``template``."""
    systems = [m["content"] for m in messages if m["role"] == "system"]
    if not systems and default_system:
        messages = [{"role": "system", "content": default_system}] + list(messages)
        systems = [default_system]
    root = {"System": "\n\n".join(systems), "Messages": [{"Role": m["role"], "Content": m["content"]}
                                                         for m in messages]}
    out: list[str] = []
    _run(parse(template), root, root, [{"$": root}], out)
    return "".join(out)
