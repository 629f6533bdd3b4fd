"""Sphinx configuration of the nngf_fem documentation (``make docs``).

Two parts of the site are generated here, at every build, into ``docs/generated/``
(ignored by git):

* ``generated/api/``: one page per public name of ``nngf_fem.__all__``, documented as
  ``nngf_fem.<Name>`` (not by submodule path), so a new export cannot be forgotten;
* ``generated/demos/``: the demo scripts ``demos/*.py`` (jupytext "light" format: the
  leading ``# # Title`` comment block is markdown) as MyST pages, not executed.

Files are only rewritten when their content changes, so incremental builds stay fast.
"""

import ast
import inspect
import os
import pathlib

# The package needs DOLFINx: it is installed in the project's venv, so autodoc imports the
# real package. Serial import only: no MPI excepthook is installed on one rank.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import nngf_fem  # noqa: E402

import jupytext  # noqa: E402
from sphinx.util.nodes import make_refnode  # noqa: E402

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
GENERATED = DOCS / "generated"

# -- project ---------------------------------------------------------------------------
project = "nngf_fem"
author = "nngf_fem developers"
copyright = "nngf_fem developers (MIT license)"  # noqa: A001
release = nngf_fem.__version__
version = release

# -- general -----------------------------------------------------------------------------
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
# "--expand" must stay two hyphens (command-line options); quotes and ellipses only
smartquotes_action = "qe"
default_role = "code"  # `x` in a docstring is code, as in markdown

myst_enable_extensions = ["dollarmath", "amsmath", "deflist", "colon_fence"]
myst_heading_anchors = 3

# -- autodoc / napoleon (Google style docstrings) -------------------------------------------
autodoc_default_options = {
    "members": True,
    "member-order": "bysource",
    "show-inheritance": True,
}
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_preserve_defaults = True
autoclass_content = "class"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True

# -- html ------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"nngf_fem {release}"
html_static_path: list[str] = []
html_last_updated_fmt = None

# ======================================================================================
# generated pages
# ======================================================================================


def _write(path: pathlib.Path, text: str) -> None:
    """Write ``text`` unless the file holds it already (keeps Sphinx's cache valid)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _prune(folder: pathlib.Path, keep: set[str]) -> None:
    """Remove generated pages of names that no longer exist."""
    for old in folder.glob("*"):
        if old.name not in keep:
            old.unlink()


def _kind(obj) -> str:
    if inspect.ismodule(obj):
        return "module"
    if inspect.isclass(obj):
        return "class"
    if callable(obj):
        return "function"
    return "data"


_KIND_TITLES = {"class": "Classes", "function": "Functions", "module": "Modules",
                "data": "Data"}


def _api_page(name: str, obj) -> str:
    kind = _kind(obj)
    title = f"nngf_fem.{name}"
    head = f"{title}\n{'=' * len(title)}\n\n"
    if kind == "module":
        # the submodule itself (its own __all__ decides the members); members that are
        # exported at the top level too have their own page: linked, not documented twice
        shared = [m for m in getattr(obj, "__all__", [])
                  if m in nngf_fem.__all__ and getattr(nngf_fem, m) is getattr(obj, m, None)]
        text = head + f".. automodule:: {obj.__name__}\n"
        if shared:
            text += f"   :exclude-members: {', '.join(shared)}\n\n"
            text += ("\n.. seealso::\n\n   Exported at the top level as well, and documented "
                     "there: " + ", ".join(f":doc:`nngf_fem.{m} <{m}>`" for m in shared) + ".\n")
        return text
    if kind == "data":
        return (head + ".. currentmodule:: nngf_fem\n\n"
                f".. py:data:: {name}\n   :type: {type(obj).__name__}\n"
                f"   :value: {obj!r}\n\n"
                + ("   The package version.\n" if name == "__version__" else
                   "   A value exported by :mod:`nngf_fem`.\n"))
    directive = "autoclass" if kind == "class" else "autofunction"
    where = (f"Defined in :ref:`{obj.__module__} <module-{obj.__module__}>`; use it as "
             f"``nngf_fem.{name}``.")
    return head + f".. currentmodule:: nngf_fem\n\n.. {directive}:: {name}\n\n{where}\n"


def generate_api() -> None:
    """``generated/api/<name>.rst`` for every name of ``nngf_fem.__all__``, and an index."""
    folder = GENERATED / "api"
    names = list(nngf_fem.__all__)
    missing = [n for n in names if not hasattr(nngf_fem, n)]
    if missing:
        raise RuntimeError(f"nngf_fem.__all__ names missing attributes: {missing}")
    groups: dict[str, list[str]] = {k: [] for k in _KIND_TITLES}
    files = set()
    for name in names:
        obj = getattr(nngf_fem, name)
        _write(folder / f"{name}.rst", _api_page(name, obj))
        files.add(f"{name}.rst")
        groups[_kind(obj)].append(name)
    lines = ["API reference", "=============", "",
             "Every public name of ``nngf_fem`` (its ``__all__``), one page each. Import the",
             "package first (``import nngf_fem as nf``: it loads DOLFINx in the right order)",
             "and use the names from the top level, ``nf.NeuralField``, ``nf.H1`` ...; the",
             "submodules they are defined in are an implementation detail.", ""]
    for kind, title in _KIND_TITLES.items():
        members = sorted(groups[kind], key=str.lower)
        if not members:
            continue
        lines += [title, "-" * len(title), "", ".. list-table::", "   :widths: 30 70", ""]
        for name in members:
            obj = getattr(nngf_fem, name)
            doc = inspect.getdoc(obj) if kind != "data" else None
            summary = (doc or "").strip().split("\n\n")[0].replace("\n", " ")
            if kind == "data" and name == "__version__":
                summary = f"The package version, ``{obj}``."
            lines += [f"   * - :doc:`nngf_fem.{name} <{name}>`", f"     - {summary}"]
        lines += ["", ".. toctree::", "   :hidden:", ""]
        lines += [f"   {name}" for name in members]
        lines.append("")
    lines += ["Implementation modules", "----------------------", "",
              "What each module that defines an exported name says about itself: "
              ":doc:`modules`.", "", ".. toctree::", "   :hidden:", "", "   modules", ""]
    _write(folder / "index.rst", "\n".join(lines))
    _write(folder / "modules.rst", _modules_page(names))
    files |= {"index.rst", "modules.rst"}
    _prune(folder, files)


def _modules_page(names: list[str]) -> str:
    """The docstrings of the modules that define the exported names (no members).

    These modules are an implementation detail (their paths change), but their
    docstrings explain how the pieces work; each exported name's page links here.
    """
    defined: dict[str, list[str]] = {}
    for name in names:
        obj = getattr(nngf_fem, name)
        if _kind(obj) in ("class", "function"):
            defined.setdefault(obj.__module__, []).append(name)
    title = "Implementation modules"
    lines = [title, "=" * len(title), "",
             "The exported names are defined in the modules below. Use them from the top",
             "level (``nf.NeuralField``): the module paths are an implementation detail",
             "and may change. The modules' own descriptions are collected here because",
             "they explain how the pieces fit together.", ""]
    for mod in sorted(defined):
        lines += [f".. _module-{mod}:", "", mod, "-" * len(mod), "",
                  "Defines " + ", ".join(f":doc:`nngf_fem.{n} <{n}>`"
                                        for n in sorted(defined[mod], key=str.lower)) + ".",
                  "", f".. automodule:: {mod}", "   :no-index:", "   :no-members:", ""]
    return "\n".join(lines)


# -- demos -------------------------------------------------------------------------------

#: figures from docs/ shown on a demo's page (made by that demo)
DEMO_FIGURES = {
    "demo_darcy_inversion": [("darcy_coefficient.png", "true and recovered coefficient"),
                             ("darcy_history.png",
                              "energy, alignment, network size, error; red lines: expansions")],
    "demo_ritz_poisson": [("ritz_poisson_history.png",
                           "energy, alignment, size and error per iteration")],
}


def _options(source: str) -> list[tuple[str, str, str]]:
    """``(flag, default, help)`` of every ``parser.add_argument`` call, read with ``ast``."""
    rows = []
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return rows
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_argument" and node.args):
            continue
        flags = [a.value for a in node.args if isinstance(a, ast.Constant)]
        if not flags or not all(isinstance(f, str) for f in flags):
            continue
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        default = ""
        if "default" in kw:
            default = ast.unparse(kw["default"])
        elif isinstance(kw.get("action"), ast.Constant) and kw["action"].value == "store_true":
            default = "off"
        text = ""
        if isinstance(kw.get("help"), ast.Constant):
            text = str(kw["help"].value)
        elif "help" in kw:  # e.g. implicitly concatenated strings
            try:
                text = str(ast.literal_eval(kw["help"]))
            except ValueError:
                text = ""
        choices = kw.get("choices")
        if isinstance(choices, ast.List | ast.Tuple) and all(
                isinstance(c, ast.Constant) for c in choices.elts):
            text = (text + "; " if text else "") + "one of " + ", ".join(
                f"`{c.value}`" for c in choices.elts)
        rows.append((", ".join(flags), default, text))
    return rows


def _cell(text: str) -> str:
    """A markdown table cell: pipes escaped, code in backticks."""
    return text.replace("|", "\\|")


def _demo_page(path: pathlib.Path) -> str:
    source = path.read_text()
    nb = jupytext.reads(source, fmt="py:light")
    out: list[str] = []
    code: list[str] = []

    def flush() -> None:
        if code:
            out.append("```python\n" + "\n\n".join(code).rstrip() + "\n```\n")
            code.clear()

    first = True
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            flush()
            text = cell.source.rstrip() + "\n"
            out.append(text)
            if first:  # after the introduction: how to run it, its options, figures
                out.append(_demo_intro(path, source))
            first = False
        else:
            code.append(cell.source.rstrip())
    flush()
    return "\n".join(out)


def _demo_intro(path: pathlib.Path, source: str) -> str:
    rel = path.relative_to(ROOT).as_posix()
    parts = [
        f"The script is `{rel}` in the repository. Run it from the repository root (the "
        "venv of `make setup`) on 2 MPI ranks; `--help` lists its options:\n",
        f"```bash\n.venv/bin/mpiexec -n 2 .venv/bin/python {rel} --help\n```\n",
        "This page shows the script as it is (it is not executed when the documentation "
        "is built).\n",
    ]
    for fig, alt in DEMO_FIGURES.get(path.stem, []):
        parts.append(f"![{alt}](../../{fig})\n")
    rows = _options(source)
    if rows:
        parts.append("Command-line options:\n")
        parts.append("| option | default | what |\n|---|---|---|")
        parts += [f"| `{_cell(f)}` | `{_cell(d)}` | {_cell(h)} |" if d else
                  f"| `{_cell(f)}` | | {_cell(h)} |" for f, d, h in rows]
        parts.append("")
    parts.append("## The script\n")
    return "\n".join(parts)


#: the order of the demos list (a demo not named here follows, alphabetically)
DEMO_ORDER = ["demo_darcy_inversion", "demo_nonlinear_inversion", "demo_gmsh_inversion",
              "demo_ritz_poisson", "demo_regression", "demo_parametric", "demo_poisson"]


def _title(page: str) -> str:
    for line in page.splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return ""


def generate_demos() -> None:
    """``generated/demos/<name>.md`` for every ``demos/demo_*.py``, and their index."""
    folder = GENERATED / "demos"
    paths = sorted((ROOT / "demos").glob("demo_*.py"),
                   key=lambda p: (DEMO_ORDER.index(p.stem) if p.stem in DEMO_ORDER
                                  else len(DEMO_ORDER), p.stem))
    files = {"index.md"}
    rows = []
    for path in paths:
        page = _demo_page(path)
        _write(folder / f"{path.stem}.md", page)
        files.add(f"{path.stem}.md")
        rows.append(f"| [`{path.name}`]({path.stem}.md) | {_cell(_title(page))} |")
    index = ["# Demos", "",
             "Each demo is a script in `demos/`, runnable as",
             "`mpiexec -n 2 python demos/<name>.py [--help]` from the repository root (with",
             "the venv of `make setup`: `.venv/bin/mpiexec`, `.venv/bin/python`). Each prints",
             "a summary on rank 0, writes its outputs to `out_<name>/` and ends by asserting",
             "success; the test suite runs every demo small, serially and on 2 ranks. The",
             "pages show the scripts as they are; they are not run when the documentation is",
             "built.", "", "| script | what |", "|---|---|", *rows, "",
             "```{toctree}", ":hidden:", "", *[p.stem for p in paths], "```", ""]
    _write(folder / "index.md", "\n".join(index))
    _prune(folder, files)


def _bases(app, name, obj, options, bases: list) -> None:
    """Leave ``object`` out of "Bases:" (every class has it)."""
    bases[:] = [b for b in bases if b is not object]


def _resolve_moved(app, env, node, contnode):
    """Resolve ``nngf_fem.<module>.<Name>`` references to the documented ``nngf_fem.<Name>``.

    Docstrings cross-reference by defining module (``~nngf_fem.field.NeuralField``); the
    API pages document the top-level names: module components after ``nngf_fem.`` are
    dropped one at a time until the name is a documented object. A module reference
    (``:mod:`nngf_fem.flow```) goes to that module's section of the modules page.
    """
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    if not target.startswith("nngf_fem."):
        return None
    if node.get("reftype") == "mod":
        found = env.get_domain("std").labels.get(f"module-{target}")
        if found is None:
            return None
        return make_refnode(app.builder, node.get("refdoc"), found[0], found[1], contnode)
    domain = env.get_domain("py")
    parts = target.split(".")
    for i in range(2, len(parts)):
        alias = "nngf_fem." + ".".join(parts[i:])
        if alias in domain.objects:
            node["reftarget"] = alias
            return domain.resolve_xref(env, node.get("refdoc"), app.builder, node["reftype"],
                                       alias, node, contnode)
    return None


def setup(app):
    """Hook the handlers above into Sphinx."""
    app.connect("autodoc-process-bases", _bases)
    app.connect("missing-reference", _resolve_moved)


generate_api()
generate_demos()
