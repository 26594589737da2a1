"""Ollama's chat-prompt path, re-implemented for tests: the Modelfile's quoted values, the system
message it adds, its message collation and the subset of Go's text/template its templates use.

Written from Ollama's source (parser/parser.go ``unquote``; server/routes.go ChatHandler, which
prepends the Modelfile's SYSTEM when the first message is not a system message; template/template.go
``collate`` and ``Execute``, which hand the template ``.System`` (every system message joined by a
blank line) and ``.Messages`` (consecutive same-role messages merged with a blank line, system
messages kept in place), with Go's ``missingkey=zero``). Where Go is installed,
``test_export_ollama.py`` checks this renderer against Go's own text/template.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


# ---------------------------------------------------------------- Modelfile and messages
def parse_modelfile(text: str) -> dict[str, Any]:
    """TEMPLATE, SYSTEM and the stop parameters of a Modelfile, unquoted as Ollama's parser does
    (a triple-quoted value is taken verbatim between the quotes, newlines included)."""
    out: dict[str, Any] = {"stop": []}
    for m in re.finditer(r'^(TEMPLATE|SYSTEM) """(.*?)"""$', text, flags=re.S | re.M):
        out[m.group(1)] = m.group(2)
    out["stop"] = re.findall(r'^PARAMETER stop "(.*)"$', text, flags=re.M)
    return out


def ollama_messages(messages: list[dict], modelfile_system: str | None) -> list[dict]:
    """The messages Ollama renders: the Modelfile's SYSTEM first unless the first message is a system one."""
    msgs = [dict(m) for m in messages]
    if modelfile_system and (not msgs or msgs[0]["role"] != "system"):
        msgs.insert(0, {"role": "system", "content": modelfile_system})
    return msgs


def collate(messages: list[dict]) -> tuple[str, list[dict]]:
    """Ollama's ``collate``: (all system contents joined by a blank line, merged message list)."""
    system, out = [], []
    for m in messages:
        if m["role"] == "system":
            system.append(m["content"])
        if out and out[-1]["Role"] == m["role"] and m["role"] != "tool":
            out[-1]["Content"] += "\n\n" + m["content"]
        else:
            out.append({"Role": m["role"], "Content": m["content"], "Thinking": m.get("reasoning_content", "")})
    return "\n\n".join(system), out


def render(
    template: str, messages: list[dict], *, modelfile_system: str | None = None, think: bool | None = None
) -> str:
    """The prompt Ollama's chat endpoint builds from ``messages`` (role/content dicts)."""
    system, msgs = collate(ollama_messages(messages, modelfile_system))
    data = {
        "System": system,
        "Messages": msgs,
        "Tools": [],
        "Response": "",
        "Think": bool(think),
        "ThinkLevel": "",
        "IsThinkSet": think is not None,
    }
    return GoTemplate(template).execute(data)


# ---------------------------------------------------------------- Go text/template subset
_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(
    r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|`[^`]*`|\$[A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*'
    r"|(?:\.[A-Za-z0-9_]+)+|\.|[A-Za-z_][A-Za-z0-9_]*|-?\d+|:=|=|,|\|)"
)


@dataclass
class _Node:
    kind: str  # text | out | if | range | decl | assign
    text: str = ""
    expr: list = field(default_factory=list)
    body: list = field(default_factory=list)
    orelse: list = field(default_factory=list)
    names: list = field(default_factory=list)


class GoTemplate:
    """Parse and execute the text/template constructs Ollama templates use: text, output, if / else
    if / else, range with ``$i, $v :=``, variable declaration and assignment, parentheses, fields
    of ``.``, ``$`` and variables, string/number/bool literals, and eq ne and or not len slice index."""

    def __init__(self, text: str):
        self.nodes, rest = self._parse(self._lex(text), 0, top=True)
        assert rest is None

    @staticmethod
    def _lex(text: str) -> list[tuple[str, str]]:
        items, at = [], 0
        for m in _ACTION.finditer(text):
            before = text[at : m.start()]
            if m.group(1):
                before = before.rstrip(" \t\r\n")
            items.append(("text", before))
            body = m.group(2).strip()
            if not body.startswith("/*"):
                items.append(("act", body))
            at = m.end()
            if m.group(3):
                rest = text[at:]
                at += len(rest) - len(rest.lstrip(" \t\r\n"))
        items.append(("text", text[at:]))
        return [(k, v) for k, v in items if not (k == "text" and v == "")]

    def _parse(self, items, i, top=False):
        nodes = []
        while i < len(items):
            kind, body = items[i]
            i += 1
            if kind == "text":
                nodes.append(_Node("text", text=body))
                continue
            word = body.split(None, 1)[0] if body else ""
            if word in ("end", "else"):
                if top:
                    raise ValueError(f"unexpected {{{{{body}}}}}")
                return nodes, (body, i)
            if word == "if":
                node, i = self._parse_if(items, i, body[2:])
                nodes.append(node)
            elif word == "range":
                spec = body[5:].strip()
                names = []
                m = re.match(r"(\$\w*)\s*(?:,\s*(\$\w*))?\s*:=\s*(.*)", spec, re.S)
                if m:
                    names = [m.group(1)] + ([m.group(2)] if m.group(2) else [])
                    spec = m.group(3)
                inner, (end, i) = self._parse(items, i)
                assert end == "end", "range ... else is not used by Ollama templates"
                nodes.append(_Node("range", expr=self._tokens(spec), body=inner, names=names))
            else:
                m = re.match(r"(\$\w*)\s*(:?=)\s*(.*)", body, re.S)
                if m:
                    nodes.append(
                        _Node(
                            "decl" if m.group(2) == ":=" else "assign",
                            names=[m.group(1)],
                            expr=self._tokens(m.group(3)),
                        )
                    )
                else:
                    nodes.append(_Node("out", expr=self._tokens(body)))
        if not top:
            raise ValueError("missing {{end}}")
        return nodes, None

    def _parse_if(self, items, i, cond):
        then, (end, i) = self._parse(items, i)
        node = _Node("if", expr=self._tokens(cond), body=then)
        if end == "end":
            return node, i
        rest = end[4:].strip()  # after "else"
        if rest.startswith("if "):
            sub, i = self._parse_if(items, i, rest[3:])
            node.orelse = [sub]
            return node, i
        node.orelse, (end2, i) = self._parse(items, i)
        assert end2 == "end"
        return node, i

    @staticmethod
    def _tokens(expr: str) -> list[str]:
        out, at = [], 0
        expr = expr.strip()
        while at < len(expr):
            m = _TOKEN.match(expr, at)
            if not m or m.end() == at:
                raise ValueError(f"cannot parse {expr[at:]!r}")
            out.append(m.group(1))
            at = m.end()
        if "|" in out:
            raise ValueError("pipes are not used by hizli's templates")
        return out

    # -------------------------------------------------------------- execution
    def execute(self, data: dict) -> str:
        out: list[str] = []
        self._run(self.nodes, data, [{"$": data}], data, out)
        return "".join(out)

    def _run(self, nodes, dot, scopes, root, out):
        for n in nodes:
            if n.kind == "text":
                out.append(n.text)
            elif n.kind == "out":
                out.append(_print(self._eval(n.expr, dot, scopes)))
            elif n.kind == "decl":
                scopes[-1][n.names[0]] = self._eval(n.expr, dot, scopes)
            elif n.kind == "assign":
                value = self._eval(n.expr, dot, scopes)
                for scope in reversed(scopes):
                    if n.names[0] in scope:
                        scope[n.names[0]] = value
                        break
                else:
                    raise ValueError(f"undefined variable {n.names[0]}")
            elif n.kind == "if":
                branch = n.body if _truth(self._eval(n.expr, dot, scopes)) else n.orelse
                self._run(branch, dot, scopes + [{}], root, out)
            elif n.kind == "range":
                for i, item in enumerate(self._eval(n.expr, dot, scopes) or []):
                    frame = {}
                    if len(n.names) == 1:
                        frame[n.names[0]] = item
                    elif len(n.names) == 2:
                        frame[n.names[0]], frame[n.names[1]] = i, item
                    self._run(n.body, item, scopes + [frame], root, out)

    def _eval(self, tokens, dot, scopes):
        value, rest = self._command(tokens, dot, scopes)
        assert not rest, f"left over: {rest}"
        return value

    def _command(self, tokens, dot, scopes):
        """One command: a function with its arguments, or a single operand. Returns (value, rest)."""
        if tokens and re.fullmatch(r"[A-Za-z_]\w*", tokens[0]) and tokens[0] not in ("true", "false", "nil"):
            name, args, rest = tokens[0], [], tokens[1:]
            while rest and rest[0] != ")":
                arg, rest = self._operand(rest, dot, scopes)
                args.append(arg)
            return _FUNCS[name](*args), rest
        return self._operand(tokens, dot, scopes)

    def _operand(self, tokens, dot, scopes):
        tok, rest = tokens[0], tokens[1:]
        if tok == "(":
            value, rest = self._command(rest, dot, scopes)
            assert rest and rest[0] == ")"
            return value, rest[1:]
        if tok.startswith('"'):
            return _go_string(tok), rest
        if tok.startswith("`"):
            return tok[1:-1], rest
        if tok in ("true", "false"):
            return tok == "true", rest
        if tok == "nil":
            return None, rest
        if re.fullmatch(r"-?\d+", tok):
            return int(tok), rest
        if tok == ".":
            return dot, rest
        if tok.startswith("$"):
            name, *path = tok.split(".")
            for scope in reversed(scopes):
                if name in scope:
                    value = scope[name]
                    break
            else:
                raise ValueError(f"undefined variable {name}")
            return _fields(value, path), rest
        if tok.startswith("."):
            return _fields(dot, tok.split(".")[1:]), rest
        raise ValueError(f"unexpected {tok!r}")


def _fields(value, path):
    for name in path:
        if not isinstance(value, dict) or name not in value:
            raise KeyError(f"no field {name!r}")  # Ollama's values always carry every field they use
        value = value[name]
    return value


def _go_string(tok: str) -> str:
    import json

    return json.loads(tok)  # Go's and JSON's escapes agree on what these templates use (\n, \", \\)


def _truth(v) -> bool:
    return not (
        v is None
        or v is False
        or v == 0
        and not isinstance(v, bool)
        and isinstance(v, int)
        or (isinstance(v, (str, list, dict)) and len(v) == 0)
    )


def _print(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "<no value>"
    return str(v)


def _and(*args):
    for a in args:
        if not _truth(a):
            return a
    return args[-1]


def _or(*args):
    for a in args:
        if _truth(a):
            return a
    return args[-1]


def _eq(a, *others):
    return any(a == b for b in others)


def _slice(x, *idx):
    if len(idx) == 0:
        return x
    if len(idx) == 1:
        return x[idx[0] :]
    return x[idx[0] : idx[1]]


_FUNCS = {
    "eq": _eq,
    "ne": lambda a, b: a != b,
    "and": _and,
    "or": _or,
    "not": lambda a: not _truth(a),
    "len": len,
    "slice": _slice,
    "index": lambda x, *i: _fields_index(x, i),
}


def _fields_index(x, idx):
    for i in idx:
        x = x[i]
    return x
