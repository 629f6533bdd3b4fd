"""Documentation checks that need no Sphinx build (``make docs`` builds the site).

* every public name of ``nngf_fem.__all__`` has its own docstring (a module its module
  docstring): the API reference shows one page per name;
* no file of the package points at a file that is not part of the repository: the old
  ``METHOD.md`` (now ``docs/method.md``) or a path that leaves the repository, such as
  ``../shared``.
"""

import nngf_fem

import inspect
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nngf_fem"

#: exported values that are neither classes, functions nor modules (documented by hand)
DATA_EXPORTS = {"__version__"}


def _own_doc(obj) -> str:
    """The object's own docstring; a class does not inherit one from its bases here."""
    doc = obj.__doc__ if not inspect.isclass(obj) else obj.__dict__.get("__doc__")
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


def test_every_public_name_has_a_docstring():
    assert nngf_fem.__all__, "nngf_fem.__all__ is empty"
    assert len(set(nngf_fem.__all__)) == len(nngf_fem.__all__), "duplicate names in __all__"
    missing, undocumented = [], []
    for name in nngf_fem.__all__:
        if not hasattr(nngf_fem, name):
            missing.append(name)
            continue
        obj = getattr(nngf_fem, name)
        if name in DATA_EXPORTS:
            continue
        if not (inspect.ismodule(obj) or inspect.isclass(obj) or callable(obj)):
            undocumented.append(f"{name} (a {type(obj).__name__} value: export a documented "
                                "function or class, or add it to DATA_EXPORTS with a page)")
        elif not _own_doc(obj):
            undocumented.append(name)
    assert not missing, f"in nngf_fem.__all__ but not defined: {missing}"
    assert not undocumented, f"public names without a docstring: {undocumented}"


def test_version_is_a_string():
    assert isinstance(nngf_fem.__version__, str) and nngf_fem.__version__


def _package_files() -> list[pathlib.Path]:
    files = [p for p in PACKAGE.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert any(p.suffix == ".py" for p in files)
    return files


def _top_level_names() -> set[str]:
    """Files and folders at the repository root (``shared/`` lives beside it, not in it)."""
    return {p.name for p in ROOT.iterdir()} - {"shared"}


#: a relative path that climbs out of its folder: ``../x``, ``../../x``
_CLIMB = re.compile(r"((?:\.\./)+)([\w.-]*)")
#: absolute paths of machines, not of the repository
_ABSOLUTE = re.compile(r"(?<![\w.])(/work/|/home/|/Users/|/root/|/mnt/|~/)")


def test_no_reference_to_files_outside_the_repository():
    inside = _top_level_names()
    bad = []
    for path in _package_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        rel = path.relative_to(ROOT)
        for lineno, line in enumerate(text.splitlines(), 1):
            if "METHOD.md" in line:
                bad.append(f"{rel}:{lineno}: METHOD.md (the method is docs/method.md)")
            for m in _CLIMB.finditer(line):
                # a path like "../meshes/x.msh" in a config example stays in the repository
                # when its first component is one of the repository's own folders
                if m.group(2) not in inside:
                    bad.append(f"{rel}:{lineno}: {m.group(0)!r} leaves the repository")
            if _ABSOLUTE.search(line):
                bad.append(f"{rel}:{lineno}: an absolute path of a machine: {line.strip()!r}")
            if re.search(r"(?<![\w/.-])shared/", line):
                bad.append(f"{rel}:{lineno}: 'shared/' is not part of the repository")
    assert not bad, "\n".join(bad)


def test_outside_paths_are_detected():
    """The check above flags what it should (a guard against a regex that matches nothing)."""
    inside = _top_level_names()
    m = _CLIMB.search('see "../shared/notes.md"')
    assert m is not None and m.group(2) not in inside
    m = _CLIMB.search('file = "../meshes/lshape.msh"')
    assert m is not None and m.group(2) in inside
    assert _ABSOLUTE.search("open('/work/main/x')")
    assert not _ABSOLUTE.search("docs/method.md")
