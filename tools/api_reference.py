"""Generate docs/api.md, the API reference, from loopfast's docstrings and signatures.

    python tools/api_reference.py           # rewrite docs/api.md
    python tools/api_reference.py --check   # exit 1 if docs/api.md is out of date

Exit status 1 also when a public name has no docstring (it is listed, and shows in the reference
as a placeholder).
    python tools/api_reference.py --stdout  # print the reference instead of writing it

Covers every name in ``loopfast.__all__`` and, when it is importable, ``loopfast.aio.__all__``.
``Channel`` is documented from the compiled class (``loopfast._core.channel``), whatever
``LOOPFAST_NO_EXTENSIONS`` says, so that the output is the same in every process. Cython gives its
methods signatures without types and its class none at all; the types (and the constructor's
parameters) come from the type stub ``src/loopfast/_core/channel.pyi``, the typed public
contract, read
with ``ast``; the constructor's defaults from the pure-Python twin, which has the same API.

The output is stable: names in ``__all__`` order, members in definition order (``Channel``'s in
the stub's order), no values that differ between runs or implementations. tests/package/test_docs.py
checks that docs/api.md is what this prints, and that every public name has a docstring.
"""

from __future__ import annotations

import argparse
import ast
import enum
import importlib
import inspect
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "api.md"
STUB = ROOT / "src" / "loopfast" / "_core" / "channel.pyi"

# Public names that are plain values: they cannot carry a docstring, so their text lives here.
DATA_DOCS: Dict[str, str] = {
    "loopfast.DEFAULT_MAX_MESSAGE_SIZE": (
        "The default `max_message_size` of every channel, listener and pipe: the largest payload "
        "accepted from the peer, in bytes (4 GiB). Large enough for any realistic message (a "
        "2.5 GiB array passes), small enough that a corrupt or hostile length field cannot make "
        "a receiver try to allocate an absurd amount. Pass `max_message_size=None` for no "
        "limit."),
    "loopfast.__version__": "The package version, a string such as `\"0.1.0\"`.",
    "loopfast.implementation": (
        "Which channel implementation this process uses: `\"compiled\"` (the Cython core, the "
        "default) or `\"python\"` (the pure-Python twin: with `LOOPFAST_NO_EXTENSIONS=1`, on "
        "interpreters other than CPython, or where the compiled extension is missing). Both have "
        "the same API and wire protocol; the twin is slower and never busy-polls."),
}
# Values shown beside the description: only those that are the same in every process.
SHOW_VALUE = {"loopfast.DEFAULT_MAX_MESSAGE_SIZE"}


class DocError(Exception):
    """A public name that cannot be documented (no docstring, no stub entry, ...)."""


# ---- where the documented objects come from ------------------------------------------------------

def compiled_channel() -> Optional[type]:
    """The compiled Channel class, or None where the extension is not built."""
    try:
        from loopfast._core.channel import Channel
    except ImportError:
        return None
    return Channel


def pure_channel() -> type:
    from loopfast._core.channel_py import Channel
    return Channel


def aio_module() -> Optional[ModuleType]:
    """loopfast.aio, or None while it does not exist."""
    try:
        return importlib.import_module("loopfast.aio")
    except ModuleNotFoundError as exc:
        if exc.name == "loopfast.aio":
            return None
        raise


def documented_modules() -> List[Tuple[str, ModuleType]]:
    import loopfast
    modules = [("loopfast", loopfast)]
    aio = aio_module()
    if aio is not None:
        modules.append(("loopfast.aio", aio))
    return modules


def resolve_public(module_name: str, module: ModuleType, name: str) -> Any:
    """The object documented as module.name: Channel (and Connection, its alias) is always the
    compiled class if built."""
    obj = getattr(module, name)
    if module_name == "loopfast" and name in ("Channel", "Connection"):
        return compiled_channel() or obj
    return obj


# ---- public members of a class -------------------------------------------------------------------

def is_public(name: str) -> bool:
    return not name.startswith("_")


def public_members(cls: type) -> Dict[str, Any]:
    """Public attributes defined by `cls` (and its loopfast bases), in definition order."""
    members: Dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not klass.__module__.startswith("loopfast"):
            continue
        for name, value in vars(klass).items():
            if is_public(name):
                members[name] = value
    return members


def is_compiled(obj: Any) -> bool:
    """Defined in the Cython module (whose docstrings start with an embedded signature)."""
    return getattr(obj, "__module__", None) == "loopfast._core.channel"


# ---- docstrings ----------------------------------------------------------------------------------

_EMBEDDED_SIGNATURE = re.compile(r"^[A-Za-z_][\w.]*\(.*\)(\s*->\s*.+)?$")


# Problems found by the current generate(): reported all at once rather than at the first.
_problems: List[str] = []


def problem(message: str) -> str:
    _problems.append(message)
    return f"*({message})*"


def clean_docstring(obj: Any) -> str:
    """The cleaned docstring of `obj`, without the signature line Cython embeds ("" if none)."""
    doc = obj.__func__.__doc__ if isinstance(obj, (classmethod, staticmethod)) else obj.__doc__
    if not isinstance(doc, str):
        return ""
    lines = doc.expandtabs().split("\n")
    if is_compiled(obj):
        signature_line = _EMBEDDED_SIGNATURE.match(lines[0].strip())
        if signature_line and (len(lines) == 1 or not lines[1].strip()):
            lines = lines[2:]
    return inspect.cleandoc("\n".join(lines))


def docstring(obj: Any, what: str) -> str:
    text = clean_docstring(obj)
    return text if text else problem(f"{what} has no docstring")


def markdown(doc: str) -> str:
    """reST habits of the docstrings, made Markdown: 'text::' introduces a code block."""
    out = []
    for line in doc.split("\n"):
        if line.strip() == "::":
            continue
        if line.endswith("::"):
            line = line[:-1]
        out.append(line)
    return "\n".join(out).strip()


# ---- the type stub of the compiled channel -------------------------------------------------------

class StubMember:
    def __init__(self, kind: str, params: List[Tuple[str, str, Optional[str]]],
                 returns: Optional[str]) -> None:
        self.kind = kind  # "method", "classmethod", "property"
        self.params = params  # (name, kind, annotation) kinds: "pos", "kwonly", "varargs", ...
        self.returns = returns
        self.settable = False


def read_stub(path: Path = STUB) -> Dict[str, StubMember]:
    """The members of ``class Channel`` in the stub, in order (``__init__`` included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    cls = next(node for node in tree.body
               if isinstance(node, ast.ClassDef) and node.name == "Channel")
    members: Dict[str, StubMember] = {}
    for node in cls.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        decorators = [ast.unparse(d) for d in node.decorator_list]
        if any(d.endswith(".setter") for d in decorators):
            members[node.name].settable = True
            continue
        kind = ("property" if "property" in decorators
                else "classmethod" if "classmethod" in decorators else "method")
        args = node.args
        ordered = ([(arg, "posonly") for arg in args.posonlyargs]
                   + [(arg, "pos") for arg in args.args]
                   + ([(args.vararg, "varargs")] if args.vararg else [])
                   + [(arg, "kwonly") for arg in args.kwonlyargs]
                   + ([(args.kwarg, "varkw")] if args.kwarg else []))
        params = [(arg.arg, kind, None if arg.annotation is None else ast.unparse(arg.annotation))
                  for arg, kind in ordered]
        members[node.name] = StubMember(
            kind, params, None if node.returns is None else ast.unparse(node.returns))
    return members


# ---- signatures ----------------------------------------------------------------------------------

_MODULE_PATH = re.compile(r"\b(?:[a-z_][a-z0-9_]*\.)+(?=[A-Za-z_])")
# Type aliases the signatures use, spelled out once in the reference's introduction.
_ADDRESS = "Union[Tuple[str, int], Tuple[str, int, int, int]]"
_ALIASES = (
    ("Union[Tuple[str, int], Tuple[str, int, int, int], None]", "Optional[Address]"),
    (_ADDRESS, "Address"),
    ("_Address", "Address"),
)


def format_annotation(annotation: Any) -> Optional[str]:
    """An annotation as text, module paths dropped (``loopfast._core.channel_py.Channel``:
    ``Channel``),
    so that it reads the same whichever implementation is loaded."""
    if annotation is inspect.Parameter.empty:
        return None
    text = annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)
    text = _MODULE_PATH.sub("", text).replace("NoneType", "None")
    for long, short in _ALIASES:
        text = text.replace(long, short)
    return text


def format_default(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    text = repr(value)
    if " at 0x" in text:
        raise DocError(f"a default value has no stable repr: {text}")
    return text


def format_signature(sig: inspect.Signature, annotations: Optional[Dict[str, str]] = None,
                     returns: Optional[str] = None, skip_first: bool = False) -> str:
    """``(a, b: int = 1, *, c=None) -> T``; `annotations` (by name) fill in missing types."""
    annotations = annotations or {}
    parts: List[str] = []
    params = list(sig.parameters.values())
    if skip_first:
        params = params[1:]
    star_done = False
    for i, p in enumerate(params):
        if p.kind == p.KEYWORD_ONLY and not star_done:
            parts.append("*")
            star_done = True
        if p.kind == p.VAR_POSITIONAL:
            star_done = True
        prefix = "*" if p.kind == p.VAR_POSITIONAL else "**" if p.kind == p.VAR_KEYWORD else ""
        ann = format_annotation(p.annotation) or annotations.get(p.name)
        text = prefix + p.name + (f": {ann}" if ann else "")
        if p.default is not p.empty:
            text += (" = " if ann else "=") + format_default(p.default)
        parts.append(text)
        if p.kind == p.POSITIONAL_ONLY and (
                i + 1 == len(params) or params[i + 1].kind != p.POSITIONAL_ONLY):
            parts.append("/")
    result = f"({', '.join(parts)})"
    ret = format_annotation(sig.return_annotation) or returns
    if ret:
        result += f" -> {ret}"
    return result


def stub_signature(member: StubMember, runtime: Optional[inspect.Signature],
                   defaults: Optional[inspect.Signature] = None) -> str:
    """A compiled method's signature: the runtime's parameters (names, kinds, defaults) typed
    from the stub; without a runtime signature (the constructor), the stub's parameters with the
    defaults of `defaults` (the twin's)."""
    annotations = {name: format_annotation(ann) or "" for name, _, ann in member.params if ann}
    returns = format_annotation(member.returns) if member.returns else None
    if runtime is not None:
        return format_signature(runtime, annotations, returns,
                                skip_first=_first_is_self(runtime))
    kinds = {"posonly": inspect.Parameter.POSITIONAL_ONLY,
             "pos": inspect.Parameter.POSITIONAL_OR_KEYWORD,
             "varargs": inspect.Parameter.VAR_POSITIONAL,
             "kwonly": inspect.Parameter.KEYWORD_ONLY,
             "varkw": inspect.Parameter.VAR_KEYWORD}
    params = []
    for name, kind, _ in member.params[1:]:  # without self
        default = inspect.Parameter.empty
        if defaults is not None and name in defaults.parameters:
            default = defaults.parameters[name].default
        params.append(inspect.Parameter(name, kinds[kind], default=default))
    return format_signature(inspect.Signature(params), annotations,
                            None if returns == "None" else returns)


def _first_is_self(sig: inspect.Signature) -> bool:
    params = list(sig.parameters)
    return bool(params) and params[0] in ("self", "cls")


def callable_signature(obj: Any, what: str, method: bool = False) -> str:
    """`obj`'s signature; a class's without its ``-> None``, a method's without self/cls, and a
    function returning a coroutine with the type its await gives."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        raise DocError(f"{what}: no signature (and no stub to fall back on)") from None
    if inspect.isclass(obj):
        sig = sig.replace(return_annotation=inspect.Signature.empty)
    returns = format_annotation(sig.return_annotation)
    if returns is not None:
        awaited = _COROUTINE.match(returns)
        if awaited:
            sig = sig.replace(return_annotation=awaited.group(1))
    return format_signature(sig, skip_first=method and _first_is_self(sig))


_COROUTINE = re.compile(r"^(?:Coroutine|Awaitable)\[(?:Any, Any, )?(.*)\]$")


# ---- rendering -----------------------------------------------------------------------------------

def anchor(qualname: str) -> str:
    return f'<a id="{qualname}"></a>'


def kind_of(obj: Any) -> str:
    if inspect.isclass(obj):
        return "exception" if issubclass(obj, BaseException) else "class"
    if callable(obj):
        return "function"
    return "data"


def base_names(cls: type) -> str:
    names = []
    for base in cls.__bases__:
        if base is object:
            continue
        module = base.__module__
        if module == "builtins":
            names.append(base.__name__)
        elif module.startswith("multiprocessing"):
            names.append(f"multiprocessing.{base.__name__}")
        else:
            names.append(f"{module.split('.')[0]}.{base.__name__}")
    return ", ".join(names)


def is_async(func: Any) -> bool:
    if inspect.iscoroutinefunction(func):
        return True
    try:
        ret = inspect.signature(func).return_annotation
    except (TypeError, ValueError):
        return False
    return "Coroutine" in (format_annotation(ret) or "")


def render_function(module_name: str, name: str, obj: Any) -> List[str]:
    qual = f"{module_name}.{name}"
    prefix = "await " if is_async(obj) else ""
    return [anchor(qual), f"### `{prefix}{qual}{callable_signature(obj, qual)}`", "",
            markdown(docstring(obj, qual)), ""]


def render_data(module_name: str, name: str, value: Any) -> List[str]:
    qual = f"{module_name}.{name}"
    if qual not in DATA_DOCS:
        raise DocError(f"{qual} is a value without a description in tools/api_reference.py "
                       "DATA_DOCS")
    heading = f"### `{qual}`"
    if qual in SHOW_VALUE:
        heading = f"### `{qual} = {value!r}`"
    return [anchor(qual), heading, "", DATA_DOCS[qual], ""]


def render_exception(module_name: str, name: str, cls: type) -> List[str]:
    qual = f"{module_name}.{name}"
    bases = base_names(cls)
    return [anchor(qual), f"### `exception {qual}({bases})`", "", markdown(docstring(cls, qual)),
            ""]


def protocols(cls: type) -> List[str]:
    supported = []
    if hasattr(cls, "__enter__"):
        supported.append("`with` (closes on exit)")
    if hasattr(cls, "__aenter__"):
        supported.append("`async with` (closes on exit)")
    if hasattr(cls, "__aiter__"):
        supported.append("`async for message in ...`")
    if hasattr(cls, "__iter__"):
        supported.append("`for ... in ...`")
    return supported


def render_class(module_name: str, name: str, cls: type) -> List[str]:
    qual = f"{module_name}.{name}"
    stub = read_stub() if cls is compiled_channel() else None
    if stub is not None:
        init = stub.get("__init__")
        if init is None:
            raise DocError(f"{STUB.name} has no Channel.__init__")
        signature = stub_signature(init, None, inspect.signature(pure_channel()))
    else:
        signature = callable_signature(cls, qual)
    lines = [anchor(qual), f"### `class {qual}{signature}`", "", markdown(docstring(cls, qual)),
             ""]
    supported = protocols(cls)
    if supported:
        lines += [f"Supports {', '.join(supported)}.", ""]
    members = public_members(cls)
    if stub is not None:
        missing = [m for m in members if m not in stub]
        if missing:
            raise DocError(f"{qual}: public member(s) missing from {STUB.name}: "
                           f"{', '.join(missing)}")
        order = [m for m in stub if is_public(m) and m in members]
        extra = [m for m in stub if is_public(m) and m not in members]
        if extra:
            raise DocError(f"{qual}: {STUB.name} declares member(s) the class lacks: "
                           f"{', '.join(extra)}")
        members = {m: members[m] for m in order}
    for member, value in members.items():
        lines += render_member(name, qual, member, value, cls, stub)
    return lines


def render_member(cls_name: str, cls_qual: str, member: str, value: Any, cls: type,
                  stub: Optional[Dict[str, StubMember]]) -> List[str]:
    qual = f"{cls_qual}.{member}"
    title = f"{cls_name}.{member}"
    entry = stub.get(member) if stub is not None else None
    doc_source = getattr(cls, member) if isinstance(value, classmethod) else value
    if isinstance(value, property) or type(value).__name__ == "getset_descriptor":
        if entry is not None:
            type_text, settable = format_annotation(entry.returns), entry.settable
        else:
            fget = value.fget
            type_text = format_annotation(inspect.signature(fget).return_annotation)
            settable = value.fset is not None
        heading = f"#### `{title}{': ' + type_text if type_text else ''}`"
        heading += " (property, settable)" if settable else " (property, read-only)"
    else:
        func = getattr(cls, member)
        if entry is not None:
            sig = stub_signature(entry, inspect.signature(func))
        else:
            sig = callable_signature(func, qual, method=not inspect.ismethod(func))
        classmethod_ = isinstance(value, classmethod) or inspect.ismethod(func)
        prefix = "await " if is_async(func) else ""
        heading = f"#### `{prefix}{title}{sig}`" + (" (classmethod)" if classmethod_ else "")
    return [anchor(qual), heading, "", markdown(docstring(doc_source, qual)), ""]


RENDERERS: Dict[str, Callable[[str, str, Any], List[str]]] = {
    "function": render_function,
    "class": render_class,
    "exception": render_exception,
    "data": render_data,
}
SECTION_TITLES = {"class": "Classes", "function": "Functions", "exception": "Exceptions",
                  "data": "Constants"}
SECTION_ORDER = ("function", "class", "exception", "data")


def generate() -> str:
    """The whole of docs/api.md. A missing docstring becomes a visible placeholder, and is
    listed by `problems()` until the next call (tests/package/test_docs.py checks docstrings
    itself)."""
    del _problems[:]
    return _generate()


def problems() -> List[str]:
    """What the last generate() found missing."""
    return list(_problems)


def _generate() -> str:
    lines = [
        "# API reference",
        "",
        "<!-- Generated by tools/api_reference.py from the docstrings and signatures: do not "
        "edit by hand.",
        "     Refresh with: python tools/api_reference.py -->",
        "",
        "Every public name of `loopfast` and `loopfast.aio`, with its docstring. Signatures "
        "carry the types of the annotations (for `Channel`, of its stub `_core/channel.pyi`). "
        "`Channel` is documented once: the compiled core and the pure-Python twin "
        "(`loopfast.implementation`) have the same API. Start with the "
        "[README](../README.md) for a tour, and [the protocol](protocol.md) for the bytes on the "
        "wire.",
        "",
        "Names used in the signatures: `Address` is a `(host, port)` tuple, or `(host, port, "
        "flowinfo, scope_id)` for IPv6, on a loopback address (anything else is refused); "
        "`Buffer` is any object with the buffer protocol (`bytes`, `bytearray`, `memoryview`, "
        "`array.array`, a numpy array); `Serializer` is an object with `dumps(obj)` and "
        "`loads(data)` (a module such as `msgspec.msgpack`, or your own). Every `timeout` is in "
        "seconds, `None` meaning no limit.",
        "",
    ]
    modules = documented_modules()
    documented: Dict[int, str] = {}  # id(object) -> the name it is documented under
    contents = ["## Contents", ""]
    body: List[str] = []
    for module_name, module in modules:
        names = list(module.__all__)
        grouped: Dict[str, List[Tuple[str, Any]]] = {kind: [] for kind in SECTION_ORDER}
        for name in names:
            obj = resolve_public(module_name, module, name)
            grouped[kind_of(obj)].append((name, obj))
        contents.append(f"- [`{module_name}`](#{module_name})")
        body += [anchor(module_name), f"## `{module_name}`", "",
                 markdown(docstring(module, module_name)), ""]
        for kind in SECTION_ORDER:
            if not grouped[kind]:
                continue
            contents.append(f"  - {SECTION_TITLES[kind]}: " + ", ".join(
                f"[`{name}`](#{module_name}.{name})" for name, _ in grouped[kind]))
            body += [f"## {SECTION_TITLES[kind]} (`{module_name}`)", ""]
            for name, obj in grouped[kind]:
                alias_of = documented.get(id(obj))
                if alias_of is not None:  # another name of something documented already
                    body += [anchor(f"{module_name}.{name}"), f"### `{module_name}.{name}`", "",
                             f"The same object as [`{alias_of}`](#{module_name}.{alias_of}).",
                             ""]
                    continue
                documented[id(obj)] = name
                body += RENDERERS[kind](module_name, name, obj)
    text = "\n".join(lines + contents + [""] + body)
    return re.sub(r"\n{3,}", "\n\n", text).rstrip("\n") + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if docs/api.md differs from what would be generated")
    parser.add_argument("--stdout", action="store_true", help="print instead of writing")
    args = parser.parse_args(argv)
    if compiled_channel() is None:
        print("api_reference: the compiled extension is not built (python setup.py build_ext "
              "--inplace); the reference documents the compiled Channel", file=sys.stderr)
        return 2
    try:
        text = generate()
    except DocError as exc:
        print(f"api_reference: {exc}", file=sys.stderr)
        return 1
    status = 0
    for missing in problems():
        print(f"api_reference: {missing}", file=sys.stderr)
        status = 1
    if args.stdout:
        sys.stdout.write(text)
    elif args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        if current != text:
            print(f"api_reference: {OUTPUT.relative_to(ROOT)} is out of date: run "
                  "python tools/api_reference.py", file=sys.stderr)
            status = 1
    else:
        OUTPUT.write_text(text, encoding="utf-8")
        print(f"api_reference: wrote {OUTPUT.relative_to(ROOT)}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
