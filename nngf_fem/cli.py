"""Command line: ``nngf-fem demo NAME [ARGS]`` and ``nngf-fem run CONFIG.toml [--resume]``.

A config file describes a problem either by a named model (run by the matching demo
script) or by a Python module of the user's that builds the energy::

    [problem]
    model = "darcy"                # darcy | darcy_nonlinear | ritz_poisson | regression
    # module = "my_problem.py"     # instead: defines build(comm) -> energy

    [mesh]
    file = "../meshes/lshape.msh"  # or n = 32 (built-in unit square); not both
    observe_tag = 2                # a cell tag of mesh.file (darcy models)

    [network]
    width = 8                      # fixed network (darcy: not with expand)
    expand = true                  # darcy: start from 2 neurons and grow
    max_width = 24                 # only with expand = true

    [flow]
    metric = "H1"                  # H1 | L2 | Euclidean
    iterations = 60                # total, a resumed run continues its count
    eps = 1e-4                     # initial damping, >= 0
    length_scale = 0.1             # H1 metric ||k||^2 + l^2 ||grad k||^2, > 0
    tol = 0.2                      # asserted relative error (named models), > 0

    [data]
    noise = 0.01                   # relative noise level, >= 0
    seed = 0                       # >= 0
    alpha = 1e-7                   # Tikhonov weight, >= 0

    [output]
    folder = "out_run"
    checkpoint_every = 10          # >= 1
    quiet = true

**Validation.** Unknown sections or keys, wrong types, values outside their domain
(``data.noise = -1``, ``output.checkpoint_every = 0`` ...) and keys that the run would
ignore (``mesh.n`` for a ``problem.module`` run, ``network.max_width`` without
``network.expand``, a key the named model does not take) are reported with the
offending key, before anything runs, with exit status 2.

**Paths.** ``problem.module`` and ``mesh.file`` are resolved against the folder of the
config file (so a config works from any working directory); ``output.folder`` is
relative to the current working directory, like the demos' ``--out``.

**User modules.** ``problem.module`` names a Python file that defines ``build(comm)``
and returns an energy (an :class:`~nngf_fem.energies.EnergyFunctional`: a
``RegressionEnergy``, a ``PDEConstrainedEnergy`` ...). The module builds its own
mesh, network and data: ``mesh.*``, ``network.width``, ``flow.tol``, ``data.noise``
and ``data.alpha`` are refused for it. ``torch.manual_seed(data.seed)`` (default 0) is
called before ``build``, so that runs are reproducible. ``flow.length_scale`` sets the
H1 metric ``||u||^2 + l^2 ||grad u||^2``.

**Resuming.** Every run writes ``<output.folder>/checkpoint.pt`` (every
``output.checkpoint_every`` iterations and at the end). ``nngf-fem run CONFIG
--resume`` continues from it up to ``flow.iterations`` iterations in total (the
iteration count and the history continue; a missing checkpoint starts from iteration
0). Without ``--resume`` an existing checkpoint is never overwritten: the run is
refused with a message that suggests ``--resume`` or another output folder. Resuming
is a decision of the command line, not part of the problem description, so there is
no ``output.resume`` key. A checkpoint of another problem (another module, metric,
network) is refused by :func:`nngf_fem.checkpoint.load_checkpoint`.
"""

from nngf_fem._validate import as_int, as_real

import argparse
import importlib.util
import inspect
import pathlib
import runpy
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["ConfigError", "load_config", "main"]

DEMOS = {"darcy": "demo_darcy_inversion.py", "darcy_nonlinear": "demo_darcy_inversion.py",
         "nonlinear_inversion": "demo_nonlinear_inversion.py",
         "gmsh_inversion": "demo_gmsh_inversion.py", "parametric": "demo_parametric.py",
         "ritz_poisson": "demo_ritz_poisson.py", "regression": "demo_regression.py",
         "poisson": "demo_poisson.py"}

#: named models whose demo writes and resumes checkpoints
RESUMABLE = ("darcy", "darcy_nonlinear", "ritz_poisson")

CHECKPOINT_NAME = "checkpoint.pt"


class ConfigError(ValueError):
    """A configuration file names an unknown key or an invalid value."""


def _nonempty(name: str, value: str) -> None:
    if not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")


@dataclass(frozen=True)
class Key:
    """One config key: TOML type, allowed values, domain check."""

    type: type | tuple[type, ...]
    allowed: tuple | None = None
    check: Callable[[str, Any], Any] | None = None


def _int(minimum: int) -> Callable[[str, Any], Any]:
    return lambda name, v: as_int(name, v, minimum=minimum)


def _real(minimum: float | None = None, positive: bool = False) -> Callable[[str, Any], Any]:
    return lambda name, v: as_real(name, v, minimum=minimum, positive=positive)


_NUM = (int, float)

#: section -> key -> Key
SCHEMA: dict[str, dict[str, Key]] = {
    "problem": {"model": Key(str, ("darcy", "darcy_nonlinear", "ritz_poisson", "regression")),
                "module": Key(str, None, _nonempty)},
    "mesh": {"file": Key(str, None, _nonempty), "n": Key(int, None, _int(1)),
             "observe_tag": Key(int, None, _int(0))},
    "network": {"width": Key(int, None, _int(1)), "expand": Key(bool),
                "max_width": Key(int, None, _int(1))},
    "flow": {"metric": Key(str, ("H1", "L2", "Euclidean")),
             "iterations": Key(int, None, _int(0)),
             "eps": Key(_NUM, None, _real(minimum=0)),
             "length_scale": Key(_NUM, None, _real(positive=True)),
             "tol": Key(_NUM, None, _real(positive=True))},
    "data": {"noise": Key(_NUM, None, _real(minimum=0)), "seed": Key(int, None, _int(0)),
             "alpha": Key(_NUM, None, _real(minimum=0))},
    "output": {"folder": Key(str, None, _nonempty),
               "checkpoint_every": Key(int, None, _int(1)), "quiet": Key(bool)},
}

#: keys a problem.module run does not use, with the reason
MODULE_UNUSED = {
    ("mesh", "file"): "build(comm) creates the mesh",
    ("mesh", "n"): "build(comm) creates the mesh",
    ("mesh", "observe_tag"): "build(comm) defines the energy and its observations",
    ("network", "width"): "build(comm) creates the network",
    ("flow", "tol"): "it is the asserted error of the named models",
    ("data", "noise"): "build(comm) creates the data",
    ("data", "alpha"): "build(comm) defines the regularization",
}

#: paths resolved against the config file's folder
PATH_KEYS = (("problem", "module"), ("mesh", "file"))


def _check_values(cfg: dict) -> None:
    for section, values in cfg.items():
        if section not in SCHEMA:
            raise ConfigError(f"unknown section [{section}]; allowed: {sorted(SCHEMA)}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table")
        for key, value in values.items():
            if key not in SCHEMA[section]:
                raise ConfigError(f"unknown key {section}.{key}; allowed: "
                                  f"{sorted(SCHEMA[section])}")
            spec = SCHEMA[section][key]
            typ = spec.type
            types = typ if isinstance(typ, tuple) else (typ,)
            if not isinstance(value, typ) or (isinstance(value, bool) and bool not in types):
                names = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
                raise ConfigError(f"{section}.{key} must be of type {names}, got {value!r}")
            if spec.allowed is not None and value not in spec.allowed:
                raise ConfigError(f"{section}.{key} = {value!r} is not allowed; allowed: "
                                  f"{list(spec.allowed)}")
            if spec.check is not None:
                try:
                    spec.check(f"{section}.{key}", value)
                except ValueError as err:
                    raise ConfigError(str(err)) from None


def _check_combinations(cfg: dict) -> None:
    """Keys that contradict each other or that the run would ignore."""
    problem = cfg.get("problem", {})
    if ("model" in problem) == ("module" in problem):
        raise ConfigError("set exactly one of problem.model or problem.module")
    m, net, flow = cfg.get("mesh", {}), cfg.get("network", {}), cfg.get("flow", {})
    if "file" in m and "n" in m:
        raise ConfigError("set only one of mesh.file (a gmsh mesh) or mesh.n (the unit square "
                          "with n x n cells)")
    if "observe_tag" in m and "file" not in m:
        raise ConfigError("mesh.observe_tag is a cell tag of mesh.file: set mesh.file too")
    if "max_width" in net and not net.get("expand", False):
        raise ConfigError("network.max_width is only used with network.expand = true")
    if "length_scale" in flow and flow.get("metric", "H1") != "H1":
        raise ConfigError(f"flow.length_scale is only used with flow.metric = 'H1', not "
                          f"{flow['metric']!r}")
    if "module" in problem:
        for (section, key), why in MODULE_UNUSED.items():
            if key in cfg.get(section, {}):
                raise ConfigError(f"{section}.{key} is not used by a problem.module run ({why}); "
                                  "remove it")
    elif problem["model"] in ("darcy", "darcy_nonlinear") and net.get("expand") \
            and "width" in net:
        raise ConfigError("network.width is not used with network.expand = true (the network "
                          "starts from 2 neurons and grows up to network.max_width)")


def load_config(path: str | pathlib.Path) -> dict[str, dict[str, Any]]:
    """Read and validate a TOML config (see module docstring).

    ``problem.module`` and ``mesh.file`` are returned as absolute paths, resolved
    against the config file's folder; they must exist.

    Raises:
        ConfigError: missing file, TOML syntax, unknown section/key, bad type or value,
            a key the run would not use, a missing module or mesh file.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        cfg = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from err
    _check_values(cfg)
    _check_combinations(cfg)
    folder = path.resolve().parent
    for section, key in PATH_KEYS:
        if key in cfg.get(section, {}):
            given = cfg[section][key]
            resolved = (folder / pathlib.Path(given).expanduser()).resolve()
            if not resolved.is_file():
                raise ConfigError(f"{section}.{key}: {resolved} does not exist ({given!r} is "
                                  f"resolved against the config file's folder {folder})")
            cfg[section][key] = str(resolved)
    return cfg


def _demo_path(name: str) -> pathlib.Path:
    root = pathlib.Path(__file__).resolve().parents[1] / "demos"
    path = root / name
    if not path.is_file():
        raise ConfigError(f"demo script {path} not found (demos ship with the source tree)")
    return path


def _model_args(cfg: dict, resume: bool = False) -> tuple[str, list[str]]:
    """Translate a named-model config into the demo script's command line."""
    model = cfg["problem"]["model"]
    args: list[str] = []
    net, out = cfg.get("network", {}), cfg.get("output", {})
    flags = {("mesh", "file"): "--mesh", ("mesh", "n"): "--n",
             ("mesh", "observe_tag"): "--observe-tag", ("network", "width"): "--width",
             ("network", "max_width"): "--max-width", ("flow", "metric"): "--metric",
             ("flow", "iterations"): "--iterations", ("flow", "eps"): "--eps",
             ("flow", "length_scale"): "--length-scale", ("flow", "tol"): "--tol",
             ("data", "noise"): "--noise",
             ("data", "seed"): "--seed", ("data", "alpha"): "--alpha",
             ("output", "folder"): "--out", ("output", "checkpoint_every"): "--checkpoint-every"}
    supported = {"darcy": set(flags), "darcy_nonlinear": set(flags),
                 "ritz_poisson": {("mesh", "n"), ("network", "width"), ("flow", "iterations"),
                                  ("flow", "tol"), ("data", "seed"), ("output", "folder"),
                                  ("output", "checkpoint_every")},
                 "regression": {("mesh", "n"), ("network", "width"), ("flow", "iterations"),
                                ("data", "seed"), ("output", "folder")}}[model]
    for section in ("mesh", "network", "flow", "data", "output"):
        for key, value in cfg.get(section, {}).items():
            if (section, key) in flags:
                if (section, key) not in supported:
                    raise ConfigError(f"{section}.{key} is not supported by model '{model}'")
                args += [flags[(section, key)], str(value)]
    if net.get("expand"):
        if model not in ("darcy", "darcy_nonlinear", "regression"):
            raise ConfigError(f"network.expand is not supported by model '{model}'")
        args.append("--expand")
    if out.get("quiet"):
        if model == "regression":
            raise ConfigError("output.quiet is not supported by model 'regression'")
        args.append("--quiet")
    if model == "darcy_nonlinear":
        args.append("--nonlinear")
    if resume:
        if model not in RESUMABLE:
            raise ConfigError(f"model '{model}' writes no checkpoints and cannot --resume")
        args.append("--resume")
    return DEMOS[model], args


def _default_folder(cfg: dict) -> str:
    """The output folder of a run (the demos' defaults for named models)."""
    out = cfg.get("output", {})
    if "folder" in out:
        return out["folder"]
    if "module" in cfg["problem"]:
        return "out_run"
    return "out_" + {"darcy": "darcy_inversion", "darcy_nonlinear": "darcy_inversion",
                     "ritz_poisson": "ritz_poisson", "regression": "regression"}[
        cfg["problem"]["model"]]


def _check_checkpoint(cfg: dict, resume: bool, comm) -> None:
    """Refuse to overwrite an existing checkpoint without ``--resume`` (collective)."""
    if resume or ("model" in cfg["problem"] and cfg["problem"]["model"] not in RESUMABLE):
        return
    ckpt = pathlib.Path(_default_folder(cfg)) / CHECKPOINT_NAME
    exists = comm.bcast(ckpt.exists() if comm.rank == 0 else None, root=0)
    if exists:
        raise ConfigError(f"{ckpt} exists (an earlier run of this output folder): pass --resume "
                          "to continue it, or set another output.folder (or remove the file)")


def _load_module(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location("nngf_user_problem", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    build = getattr(module, "build", None)
    if build is None:
        raise ConfigError(f"problem.module: {path} defines no build(comm) function")
    if not callable(build):
        raise ConfigError(f"problem.module: build in {path} is not a function, got "
                          f"{type(build).__name__}")
    try:
        inspect.signature(build).bind(None)
    except TypeError:
        raise ConfigError(f"problem.module: build{inspect.signature(build)} in {path} must "
                          "take one argument, the communicator: def build(comm)") from None
    except ValueError:  # no signature (builtins): let the call tell
        pass
    return build


def run_module(cfg: dict, config_dir: pathlib.Path | None = None, resume: bool = False) -> None:
    """Run the flow on the energy built by a user module's ``build(comm)``.

    Args:
        cfg: a config from :func:`load_config` (``problem.module`` absolute, or relative
            to ``config_dir``).
        config_dir: folder that a relative ``problem.module`` is resolved against.
        resume: continue from ``<output.folder>/checkpoint.pt`` if it exists.

    Raises:
        ConfigError: no ``build(comm)``, or it returned no energy (on all ranks).
    """
    import nngf_fem as nf
    from nngf_fem.energies import EnergyFunctional
    from nngf_fem.mpi import raise_on_any

    import torch
    from mpi4py import MPI

    path = (pathlib.Path(config_dir or ".") / cfg["problem"]["module"]).resolve()
    if not path.is_file():
        raise ConfigError(f"problem.module: {path} does not exist")
    build = _load_module(path)
    comm = MPI.COMM_WORLD
    flow_cfg, net, out = cfg.get("flow", {}), cfg.get("network", {}), cfg.get("output", {})
    torch.manual_seed(cfg.get("data", {}).get("seed", 0))
    energy = build(comm)
    raise_on_any(comm, not isinstance(energy, EnergyFunctional),
                 f"problem.module: build(comm) in {path} returned {energy!r:.200} (of type "
                 f"{type(energy).__name__}); it must return an energy, an "
                 "nngf_fem.EnergyFunctional such as RegressionEnergy or PDEConstrainedEnergy",
                 ConfigError)
    name = flow_cfg.get("metric", "H1")
    if name == "H1":
        metric = nf.H1(energy.field, alpha=1.0, beta=flow_cfg.get("length_scale", 1.0) ** 2)
    else:
        metric = {"L2": nf.L2, "Euclidean": nf.Euclidean}[name](energy.field)
    flow = nf.NaturalGradientFlow(energy, metric, eps=flow_cfg.get("eps", 1e-4), max_step=1e4)
    flow.checkpoint_meta = {"problem.module": path.name, "flow.metric": name,
                            "flow.length_scale": flow_cfg.get("length_scale", 1.0)}
    policy = nf.ExpansionPolicy(max_params=4 * net.get("max_width", 32) + 1) \
        if net.get("expand") else None
    folder = pathlib.Path(_default_folder(cfg))
    ckpt = folder / CHECKPOINT_NAME
    quiet = out.get("quiet", False)
    if resume:
        exists = comm.bcast(ckpt.is_file() if comm.rank == 0 else None, root=0)
        if exists:
            nf.load_checkpoint(ckpt, flow)
        if comm.rank == 0 and not quiet:
            print(f"resumed from {ckpt} at iteration {flow.iteration}" if exists else
                  f"--resume: no checkpoint {ckpt} yet, starting at iteration 0")

    def callback(fl, rec):
        if policy is not None and policy.should_expand(fl):
            policy.expand(fl)

    res = flow.run(flow_cfg.get("iterations", 50), callback=callback, checkpoint=str(ckpt),
                   checkpoint_every=out.get("checkpoint_every", 10), progress=not quiet)
    nf.io.write_history(folder, flow.history, comm, meta={"config": cfg})
    nf.io.plot_history(folder / "history.png", flow.history, comm)
    nf.io.write_fields(folder / "field.bp", [energy.field.function])
    if comm.rank == 0:
        print(f"{res.reason}: energy {res.energy:.6e} after {res.iterations} iterations, "
              f"{energy.field.num_params} parameters; outputs in {folder}/")
    flow.destroy()
    metric.destroy()


def _load_config_collective(path: str, comm) -> dict:
    """:func:`load_config` on rank 0, result or error broadcast: all ranks agree."""
    cfg, err = None, None
    if comm.rank == 0:
        try:
            cfg = load_config(path)
        except ConfigError as exc:
            err = str(exc)
    cfg, err = comm.bcast((cfg, err), root=0)
    if err is not None:
        raise ConfigError(err)
    return cfg


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``nngf-fem``."""
    parser = argparse.ArgumentParser(prog="nngf-fem", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="run a demo script")
    p_demo.add_argument("name", choices=sorted(DEMOS))
    p_demo.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the demo")
    p_run = sub.add_parser("run", help="run a problem described in a TOML config",
                           description="Run a problem described in a TOML config (paths in it "
                           "are relative to its folder; output.folder to the working "
                           "directory).")
    p_run.add_argument("config")
    p_run.add_argument("--resume", action="store_true",
                       help="continue from <output.folder>/checkpoint.pt (without it, an "
                       "existing checkpoint is an error)")
    ns = parser.parse_args(argv)
    if ns.command == "demo":
        script, extra = DEMOS[ns.name], list(ns.args)
        if ns.name == "darcy_nonlinear":
            extra.append("--nonlinear")
    else:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        try:
            cfg = _load_config_collective(ns.config, comm)
            _check_checkpoint(cfg, ns.resume, comm)
            if "module" in cfg["problem"]:
                run_module(cfg, resume=ns.resume)
                return 0
            script, extra = _model_args(cfg, resume=ns.resume)
        except ConfigError as err:
            if comm.rank == 0:
                print(f"nngf-fem: config error: {err}", file=sys.stderr)
            return 2
    path = _demo_path(script)
    sys.argv = [str(path), *extra]
    runpy.run_path(str(path), run_name="__main__")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
