"""The API reference (docs/api.md) is generated from the docstrings and is up to date; every
public name has a docstring and appears in it; the stub and the two implementations agree.

docs/api.md out of date? Run ``python tools/api_reference.py``.
"""

import importlib.util
import inspect
from pathlib import Path

import pytest
from conftest import IMPLEMENTATIONS

import loopfast

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "api_reference.py"
API_MD = ROOT / "docs" / "api.md"
if not TOOL.is_file():
    pytest.skip("the sources are not here (testing an installed sdist or wheel)",
                allow_module_level=True)

_spec = importlib.util.spec_from_file_location("api_reference", TOOL)
api_reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(api_reference)

MODULES = api_reference.documented_modules()
PUBLIC_NAMES = [(module_name, name) for module_name, module in MODULES for name in module.__all__]
# Classes whose public members must each be documented: every public class of both modules,
# and Channel in each implementation (the one this process picked and the other one).
CLASSES = sorted(
    {(f"{module_name}.{name}", getattr(module, name)) for module_name, name in PUBLIC_NAMES
     for module in [dict(MODULES)[module_name]]
     if inspect.isclass(getattr(module, name))
     and not issubclass(getattr(module, name), BaseException)}
    | {(f"{cls.__module__}.Channel", cls) for cls in IMPLEMENTATIONS.values()},
    key=lambda item: item[0])


def public_members(cls):
    return [name for name in api_reference.public_members(cls)]


@pytest.fixture(scope="module")
def api_md():
    return API_MD.read_text(encoding="utf-8")


@pytest.mark.skipif(api_reference.compiled_channel() is None,
                    reason="the reference documents the compiled Channel, which is not built")
def test_api_md_is_what_the_tool_generates(api_md):
    assert api_md == api_reference.generate(), (
        "docs/api.md is out of date: run  python tools/api_reference.py")


@pytest.mark.parametrize(("module_name", "name"), PUBLIC_NAMES,
                         ids=[f"{m}.{n}" for m, n in PUBLIC_NAMES])
def test_every_public_name_has_a_docstring(module_name, name):
    obj = getattr(dict(MODULES)[module_name], name)
    if callable(obj):
        assert api_reference.clean_docstring(obj), f"{module_name}.{name} has no docstring"
    else:  # a value (a str, an int): described in the generator instead
        assert api_reference.DATA_DOCS.get(f"{module_name}.{name}"), (
            f"{module_name}.{name} has no description in tools/api_reference.py DATA_DOCS")


# Known gaps, reported to the owner of the module: each fails this test until fixed, and then
# (strict) its mark must go.
UNDOCUMENTED: "dict[str, str]" = {}  # qualified class name -> what lacks a docstring


@pytest.mark.parametrize(("qualname", "cls"), [
    pytest.param(qualname, cls, id=qualname, marks=[pytest.mark.xfail(
        reason=UNDOCUMENTED[qualname], strict=True)] if qualname in UNDOCUMENTED else [])
    for qualname, cls in CLASSES])
def test_every_public_member_of_a_public_class_has_a_docstring(qualname, cls):
    undocumented = [name for name, value in api_reference.public_members(cls).items()
                    if not api_reference.clean_docstring(getattr(cls, name) if isinstance(
                        value, classmethod) else value)]
    assert undocumented == [], f"{qualname}: no docstring for {', '.join(undocumented)}"


@pytest.mark.parametrize(("module_name", "name"), PUBLIC_NAMES,
                         ids=[f"{m}.{n}" for m, n in PUBLIC_NAMES])
def test_every_public_name_is_in_the_reference(api_md, module_name, name):
    assert f'<a id="{module_name}.{name}"></a>' in api_md


@pytest.mark.parametrize(("qualname", "cls"), CLASSES, ids=[q for q, _ in CLASSES])
def test_every_public_member_is_in_the_reference(api_md, qualname, cls):
    public = qualname.replace("loopfast._core.channel_py.", "loopfast.").replace(
        "loopfast._core.channel.", "loopfast.")
    if public == "loopfast.Connection":  # an alias: its members are documented as Channel's
        assert cls is loopfast.Channel
        assert "The same object as [`Channel`](#loopfast.Channel)." in api_md
        public = "loopfast.Channel"
    missing = [name for name in public_members(cls)
               if f'<a id="{public}.{name}"></a>' not in api_md]
    assert missing == [], f"{public}: not in docs/api.md: {', '.join(missing)}"


@pytest.mark.skipif(len(IMPLEMENTATIONS) < 2, reason="the compiled extension is not built")
def test_both_implementations_have_the_same_public_members():
    compiled, pure = IMPLEMENTATIONS["compiled"], IMPLEMENTATIONS["pure"]
    assert set(public_members(compiled)) == set(public_members(pure))


@pytest.mark.skipif(len(IMPLEMENTATIONS) < 2, reason="the compiled extension is not built")
@pytest.mark.parametrize("member", public_members(IMPLEMENTATIONS["pure"]))
def test_both_implementations_have_the_same_signatures(member):
    compiled, pure = IMPLEMENTATIONS["compiled"], IMPLEMENTATIONS["pure"]
    value = getattr(pure, member)
    if isinstance(inspect.getattr_static(pure, member), property):
        assert not callable(getattr(compiled, member))
        return
    assert inspect.signature(getattr(compiled, member)) == inspect.signature(value)


def test_the_stub_declares_every_public_member_of_channel_and_no_other():
    stub = api_reference.read_stub()
    declared = {name for name in stub if api_reference.is_public(name)}
    for cls in IMPLEMENTATIONS.values():
        assert declared == set(public_members(cls)), cls.__module__


@pytest.mark.parametrize("member", sorted(
    name for name, entry in api_reference.read_stub().items()
    if api_reference.is_public(name) and entry.kind != "property"))
def test_the_stub_has_the_parameters_of_each_method(member):
    entry = api_reference.read_stub()[member]
    stub_params = [(name, kind) for name, kind, _ in entry.params][1:]  # without self / cls
    kinds = {inspect.Parameter.POSITIONAL_OR_KEYWORD: "pos",
             inspect.Parameter.KEYWORD_ONLY: "kwonly",
             inspect.Parameter.POSITIONAL_ONLY: "posonly",
             inspect.Parameter.VAR_POSITIONAL: "varargs",
             inspect.Parameter.VAR_KEYWORD: "varkw"}
    for cls in IMPLEMENTATIONS.values():
        params = inspect.signature(getattr(cls, member)).parameters.values()
        runtime = [(p.name, kinds[p.kind]) for p in params]
        if runtime and runtime[0][0] in ("self", "cls"):
            runtime = runtime[1:]
        assert runtime == stub_params, cls.__module__


def test_the_stub_has_the_constructor_parameters_of_the_pure_twin():
    entry = api_reference.read_stub()["__init__"]
    pure = inspect.signature(IMPLEMENTATIONS["pure"])
    assert [name for name, _, _ in entry.params][1:] == list(pure.parameters)


def test_the_reference_says_how_to_refresh_it(api_md):
    assert "python tools/api_reference.py" in api_md



def test_help_shows_the_channel_signature_with_its_keyword_only_arguments():
    # help(loopfast.Channel) and inspect.signature() agree with the twin: max_message_size,
    # serializer and spin are keyword-only (the compiled class states its signature itself).
    for cls in IMPLEMENTATIONS.values():
        signature = inspect.signature(cls)
        assert list(signature.parameters) == ["fd", "readable", "writable", "max_message_size",
                                              "serializer", "spin"]
        kinds = {name: p.kind for name, p in signature.parameters.items()}
        assert all(kinds[name] is inspect.Parameter.KEYWORD_ONLY
                   for name in ("max_message_size", "serializer", "spin"))
        assert (signature.parameters["max_message_size"].default
                == loopfast.DEFAULT_MAX_MESSAGE_SIZE)


# ---- every README and docs example runs as written, on its own ----------------------------------

def _examples():
    """(where, code) for every Python example of README.md and docs/: the ```python blocks, and
    the indented blocks of docs/api.md (the docstrings' examples) that import something."""
    import re
    import textwrap
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        text = path.read_text(encoding="utf-8")
        name = path.relative_to(ROOT).as_posix()
        for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
            found.append((f"{name}:{text[:m.start()].count(chr(10)) + 1}", m.group(1)))
        for m in re.finditer(r"(?:^\n)((?:^(?: {4}.*)?\n)+)", text, flags=re.M):
            block = textwrap.dedent(m.group(1))
            if re.search(r"^(import|from) \w", block, flags=re.M):
                found.append((f"{name}:{text[:m.start()].count(chr(10)) + 2}", block))
    return found


@pytest.mark.timeout(300)
@pytest.mark.parametrize("where,example", _examples(), ids=[w for w, _ in _examples()])
def test_every_example_runs_as_a_file_of_its_own(where, example, tmp_path):
    # As a reader would: pasted into a file and run (a hang or an error is a broken example).
    import subprocess
    import sys
    if "numpy" in example:
        pytest.importorskip("numpy", reason="numpy is not installed")
    path = tmp_path / "example.py"
    path.write_text(example, encoding="utf-8")
    done = subprocess.run([sys.executable, "-X", "dev", str(path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"{where}:\n{example}\n---\n{done.stdout}{done.stderr}"
    assert "Traceback" not in done.stderr and "Warning" not in done.stderr, done.stderr
