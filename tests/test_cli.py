"""The nngf-fem command line: config validation, named models, user modules."""

from nngf_fem import cli

import pathlib

import pytest
from mpi4py import MPI

ROOT = pathlib.Path(__file__).resolve().parents[1]


def write(tempdir, text, name="cfg.toml"):
    path = tempdir / name
    if MPI.COMM_WORLD.rank == 0:
        path.write_text(text)
    MPI.COMM_WORLD.Barrier()
    return path


@pytest.mark.parametrize("text,match", [
    ('[problem]\nmodel = "heat"\n', r"problem.model = 'heat' is not allowed; allowed: \["),
    ('[problem]\nmodel = "darcy"\n[flow]\nmetrc = "H1"\n', r"unknown key flow.metrc; allowed"),
    ('[problm]\nmodel = "darcy"\n', r"unknown section \[problm\]"),
    ('[problem]\nmodel = "darcy"\n[flow]\niterations = "ten"\n', "flow.iterations must be of type"),
    ('[problem]\nmodel = "darcy"\nmodule = "x.py"\n', "exactly one of"),
    ('[problem\n', "invalid TOML"),
])
def test_config_errors_name_the_key(tempdir, text, match):
    with pytest.raises(cli.ConfigError, match=match):
        cli.load_config(write(tempdir, text))
    assert cli.main(["run", str(tempdir / "cfg.toml")]) == 2


def test_named_model_translates_to_demo_arguments(tempdir):
    cfg = cli.load_config(ROOT / "examples" / "darcy_lshape.toml")
    script, args = cli._model_args(cfg)
    assert script == "demo_darcy_inversion.py"
    assert args[args.index("--observe-tag") + 1] == "2" and "--expand" in args
    bad = write(tempdir, '[problem]\nmodel = "ritz_poisson"\n[mesh]\nobserve_tag = 2\n')
    with pytest.raises(cli.ConfigError, match="not supported by model 'ritz_poisson'"):
        cli._model_args(cli.load_config(bad))


def test_run_named_model_and_user_module(tempdir):
    cfg = write(tempdir, f'[problem]\nmodel = "darcy"\n[mesh]\nn = 8\n[network]\nwidth = 4\n'
                f'[flow]\niterations = 4\ntol = 0.5\n[output]\nfolder = "{tempdir / "a"}"\n'
                'quiet = true\n')
    assert cli.main(["run", str(cfg)]) == 0
    assert (tempdir / "a" / "coefficient.png").exists() or MPI.COMM_WORLD.rank != 0
    mod = write(tempdir, (ROOT / "examples" / "my_problem.py").read_text(), "prob.py")
    assert mod.exists()
    cfg2 = write(tempdir, f'[problem]\nmodule = "prob.py"\n[flow]\niterations = 3\n'
                 f'[output]\nfolder = "{tempdir / "b"}"\nquiet = true\n', "m.toml")
    assert cli.main(["run", str(cfg2)]) == 0
    assert (tempdir / "b" / "history.json").exists() or MPI.COMM_WORLD.rank != 0


def test_demo_subcommand_runs_a_demo():
    assert cli.main(["demo", "poisson", "--n", "8"]) == 0


def test_every_named_demo_exists():
    root = pathlib.Path(cli.__file__).resolve().parents[1] / "demos"
    for script in set(cli.DEMOS.values()):
        assert (root / script).is_file(), script
