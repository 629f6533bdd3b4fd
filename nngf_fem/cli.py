"""Command line: ``nngf-fem demo NAME [ARGS]`` and ``nngf-fem run CONFIG.toml``.

A config file describes a problem either by a named model (run by the matching demo
script) or by a Python module of the user's that builds the energy::

    [problem]
    model = "darcy"                # darcy | darcy_nonlinear | ritz_poisson | regression
    # module = "my_problem.py"     # instead: defines build(comm) -> energy

    [mesh]
    file = "meshes/lshape.msh"     # or n = 32 (built-in unit square)
    observe_tag = 2

    [network]
    width = 8
    expand = true
    max_width = 24

    [flow]
    metric = "H1"                  # H1 | L2 | Euclidean
    iterations = 60
    tol = 0.2                      # asserted relative error (named models)

    [data]
    noise = 0.01
    seed = 0

    [output]
    folder = "out_run"

Unknown sections or keys, wrong types and values outside the allowed set are
reported with the offending key and what is allowed, before anything runs.
"""

import argparse
import importlib.util
import pathlib
import runpy
import sys
import tomllib
from typing import Any

__all__ = ["ConfigError", "load_config", "main"]

DEMOS = {"darcy": "demo_darcy_inversion.py", "darcy_nonlinear": "demo_darcy_inversion.py",
         "nonlinear_inversion": "demo_nonlinear_inversion.py",
         "gmsh_inversion": "demo_gmsh_inversion.py", "parametric": "demo_parametric.py",
         "ritz_poisson": "demo_ritz_poisson.py", "regression": "demo_regression.py",
         "poisson": "demo_poisson.py"}

# section -> key -> (type, allowed values or None)
SCHEMA: dict[str, dict[str, tuple[type | tuple[type, ...], tuple | None]]] = {
    "problem": {"model": (str, ("darcy", "darcy_nonlinear", "ritz_poisson", "regression")),
                "module": (str, None)},
    "mesh": {"file": (str, None), "n": (int, None), "observe_tag": (int, None)},
    "network": {"width": (int, None), "expand": (bool, None), "max_width": (int, None)},
    "flow": {"metric": (str, ("H1", "L2", "Euclidean")), "iterations": (int, None),
             "eps": ((int, float), None), "length_scale": ((int, float), None),
             "tol": ((int, float), None)},
    "data": {"noise": ((int, float), None), "seed": (int, None), "alpha": ((int, float), None)},
    "output": {"folder": (str, None), "checkpoint_every": (int, None), "quiet": (bool, None)},
}


class ConfigError(ValueError):
    """A configuration file names an unknown key or an invalid value."""


def load_config(path: str | pathlib.Path) -> dict[str, dict[str, Any]]:
    """Read and validate a TOML config (see module docstring).

    Raises:
        ConfigError: missing file, TOML syntax, unknown section/key, bad type or value.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        cfg = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from err
    for section, values in cfg.items():
        if section not in SCHEMA:
            raise ConfigError(f"unknown section [{section}]; allowed: {sorted(SCHEMA)}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table")
        for key, value in values.items():
            if key not in SCHEMA[section]:
                raise ConfigError(f"unknown key {section}.{key}; allowed: "
                                  f"{sorted(SCHEMA[section])}")
            typ, allowed = SCHEMA[section][key]
            if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
                names = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
                raise ConfigError(f"{section}.{key} must be of type {names}, got {value!r}")
            if allowed is not None and value not in allowed:
                raise ConfigError(f"{section}.{key} = {value!r} is not allowed; allowed: "
                                  f"{list(allowed)}")
    problem = cfg.get("problem", {})
    if ("model" in problem) == ("module" in problem):
        raise ConfigError("set exactly one of problem.model or problem.module")
    return cfg


def _demo_path(name: str) -> pathlib.Path:
    root = pathlib.Path(__file__).resolve().parents[1] / "demos"
    path = root / name
    if not path.is_file():
        raise ConfigError(f"demo script {path} not found (demos ship with the source tree)")
    return path


def _model_args(cfg: dict) -> tuple[str, list[str]]:
    """Translate a named-model config into the demo script's command line."""
    model = cfg["problem"]["model"]
    args: list[str] = []
    m, net, flow = cfg.get("mesh", {}), cfg.get("network", {}), cfg.get("flow", {})
    data, out = cfg.get("data", {}), cfg.get("output", {})
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
                                  ("data", "seed"), ("output", "folder"),
                                  ("output", "checkpoint_every")},
                 "regression": {("mesh", "n"), ("network", "width"), ("flow", "iterations"),
                                ("data", "seed"), ("output", "folder")}}[model]
    for section, values in (("mesh", m), ("network", net), ("flow", flow), ("data", data),
                            ("output", out)):
        for key, value in values.items():
            if (section, key) in flags:
                if (section, key) not in supported:
                    raise ConfigError(f"{section}.{key} is not supported by model '{model}'")
                args += [flags[(section, key)], str(value)]
    if net.get("expand"):
        if model not in ("darcy", "darcy_nonlinear", "regression"):
            raise ConfigError(f"network.expand is not supported by model '{model}'")
        args.append("--expand")
    if out.get("quiet") and model != "regression":
        args.append("--quiet")
    if model == "darcy_nonlinear":
        args.append("--nonlinear")
    return DEMOS[model], args


def run_module(cfg: dict, config_dir: pathlib.Path) -> None:
    """Run the flow on the energy built by a user module's ``build(comm)``."""
    import nngf_fem as nf

    from mpi4py import MPI

    path = (config_dir / cfg["problem"]["module"]).resolve()
    if not path.is_file():
        raise ConfigError(f"problem.module: {path} does not exist")
    spec = importlib.util.spec_from_file_location("nngf_user_problem", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "build"):
        raise ConfigError(f"problem.module: {path} defines no build(comm) function")
    comm = MPI.COMM_WORLD
    energy = module.build(comm)
    flow_cfg, net, out = cfg.get("flow", {}), cfg.get("network", {}), cfg.get("output", {})
    metric = {"H1": nf.H1, "L2": nf.L2, "Euclidean": nf.Euclidean}[
        flow_cfg.get("metric", "H1")](energy.field)
    flow = nf.NaturalGradientFlow(energy, metric, eps=flow_cfg.get("eps", 1e-4), max_step=1e4)
    policy = nf.ExpansionPolicy(max_params=4 * net.get("max_width", 32) + 1) \
        if net.get("expand") else None
    folder = pathlib.Path(out.get("folder", "out_run"))

    def callback(fl, rec):
        if policy is not None and policy.should_expand(fl):
            policy.expand(fl)

    res = flow.run(flow_cfg.get("iterations", 50), callback=callback,
                   checkpoint=str(folder / "checkpoint.pt"),
                   checkpoint_every=out.get("checkpoint_every", 10),
                   progress=not out.get("quiet", False))
    nf.io.write_history(folder, flow.history, comm, meta={"config": cfg})
    nf.io.plot_history(folder / "history.png", flow.history, comm)
    nf.io.write_fields(folder / "field.bp", [energy.field.function])
    if comm.rank == 0:
        print(f"{res.reason}: energy {res.energy:.6e} after {res.iterations} iterations, "
              f"{energy.field.num_params} parameters; outputs in {folder}/")
    flow.destroy()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``nngf-fem``."""
    parser = argparse.ArgumentParser(prog="nngf-fem", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="run a demo script")
    p_demo.add_argument("name", choices=sorted(DEMOS))
    p_demo.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the demo")
    p_run = sub.add_parser("run", help="run a problem described in a TOML config")
    p_run.add_argument("config")
    ns = parser.parse_args(argv)
    if ns.command == "demo":
        script, extra = DEMOS[ns.name], list(ns.args)
        if ns.name == "darcy_nonlinear":
            extra.append("--nonlinear")
    else:
        try:
            cfg = load_config(ns.config)
            if "module" in cfg["problem"]:
                run_module(cfg, pathlib.Path(ns.config).resolve().parent)
                return 0
            script, extra = _model_args(cfg)
        except ConfigError as err:
            print(f"nngf-fem: config error: {err}", file=sys.stderr)
            return 2
    path = _demo_path(script)
    sys.argv = [str(path), *extra]
    runpy.run_path(str(path), run_name="__main__")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
