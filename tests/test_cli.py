"""The nngf-fem command line: config validation, named models, user modules."""

from nngf_fem import cli

import os
import pathlib

import numpy as np
import pytest
from mpi4py import MPI

ROOT = pathlib.Path(__file__).resolve().parents[1]


def write(tempdir, text, name="cfg.toml"):
    path = tempdir / name
    if MPI.COMM_WORLD.rank == 0:
        path.write_text(text)
    MPI.COMM_WORLD.Barrier()
    return path


DARCY = '[problem]\nmodel = "darcy"\n'
MODULE = '[problem]\nmodule = "x.py"\n'


@pytest.mark.parametrize("text,match", [
    ('[problem]\nmodel = "heat"\n', r"problem.model = 'heat' is not allowed; allowed: \["),
    (DARCY + '[flow]\nmetrc = "H1"\n', r"unknown key flow.metrc; allowed"),
    ('[problm]\nmodel = "darcy"\n', r"unknown section \[problm\]"),
    (DARCY + '[flow]\niterations = "ten"\n', "flow.iterations must be of type"),
    (DARCY + '[mesh]\nn = true\n', "mesh.n must be of type int, got True"),
    ('[problem]\nmodel = "darcy"\nmodule = "x.py"\n', "exactly one of"),
    ('[problem\n', "invalid TOML"),
    # values outside their domain
    (DARCY + '[data]\nnoise = -1\n', r"^data.noise must be a finite real number >= 0, got -1$"),
    (DARCY + '[flow]\niterations = -1\n', r"^flow.iterations must be an integer >= 0, got -1$"),
    (DARCY + '[output]\ncheckpoint_every = 0\n',
     r"^output.checkpoint_every must be an integer >= 1, got 0$"),
    (DARCY + '[network]\nwidth = 0\n', r"^network.width must be an integer >= 1, got 0$"),
    (DARCY + '[flow]\neps = -1e-3\n', r"^flow.eps must be a finite real number >= 0, got -0.001"),
    (DARCY + '[flow]\neps = inf\n', r"^flow.eps must be .*, got inf$"),
    (DARCY + '[flow]\ntol = 0\n', r"^flow.tol must be a finite positive real number, got 0$"),
    (DARCY + '[flow]\nlength_scale = nan\n', r"flow.length_scale must be .*, got nan$"),
    (DARCY + '[data]\nseed = -3\n', r"^data.seed must be an integer >= 0, got -3$"),
    (DARCY + '[output]\nfolder = " "\n', r"^output.folder must be a non-empty string"),
    # keys the run would ignore
    (MODULE + '[mesh]\nn = 8\n', r"^mesh.n is not used by a problem.module run \(build"),
    (MODULE + '[mesh]\nfile = "m.msh"\n', r"^mesh.file is not used by a problem.module run"),
    (MODULE + '[network]\nwidth = 8\n', r"^network.width is not used by a problem.module"),
    (MODULE + '[data]\nnoise = 0.1\n', r"^data.noise is not used by a problem.module run"),
    (MODULE + '[flow]\ntol = 0.1\n', r"^flow.tol is not used by a problem.module run"),
    (MODULE + '[network]\nmax_width = 8\n', r"network.max_width is only used with network.exp"),
    (DARCY + '[network]\nexpand = true\nwidth = 8\n', r"network.width is not used with netw"),
    (DARCY + '[mesh]\nn = 8\nfile = "a.msh"\n', r"set only one of mesh.file .* or mesh.n"),
    (DARCY + '[mesh]\nobserve_tag = 2\n', r"mesh.observe_tag is a cell tag of mesh.file"),
    (DARCY + '[flow]\nmetric = "L2"\nlength_scale = 0.1\n', r"length_scale is only used wi"),
    (DARCY + '[mesh]\nfile = "nowhere/m.msh"\n',
     r"mesh.file: .*nowhere/m.msh does not exist \('nowhere/m.msh' is resolved against the "
     r"config file's folder"),
    (MODULE, r"problem.module: .*x.py does not exist"),
])
def test_config_errors_name_the_key(tempdir, text, match, capsys):
    with pytest.raises(cli.ConfigError, match=match):
        cli.load_config(write(tempdir, text))
    assert cli.main(["run", str(tempdir / "cfg.toml")]) == 2
    if MPI.COMM_WORLD.rank == 0:
        assert "nngf-fem: config error: " in capsys.readouterr().err


def test_named_model_translates_to_demo_arguments(tempdir):
    cfg = cli.load_config(ROOT / "examples" / "darcy_lshape.toml")
    script, args = cli._model_args(cfg)
    assert script == "demo_darcy_inversion.py"
    assert args[args.index("--observe-tag") + 1] == "2" and "--expand" in args
    mesh_file = args[args.index("--mesh") + 1]  # resolved against the config's folder
    assert mesh_file == str(ROOT / "meshes" / "lshape.msh")
    bad = write(tempdir, '[problem]\nmodel = "ritz_poisson"\n[data]\nnoise = 0.1\n')
    with pytest.raises(cli.ConfigError, match="data.noise is not supported by model 'ritz_p"):
        cli._model_args(cli.load_config(bad))
    assert "--resume" in cli._model_args({"problem": {"model": "ritz_poisson"}}, resume=True)[1]
    with pytest.raises(cli.ConfigError, match="model 'regression' writes no checkpoints"):
        cli._model_args({"problem": {"model": "regression"}}, resume=True)


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


SEEDED_MODULE = """
import nngf_fem as nf
import ufl
from dolfinx import mesh


def build(comm):
    msh = mesh.create_unit_square(comm, 6, 6)
    u = nf.NeuralField(msh, nf.MLP(2, width=3, depth=1), element=("Lagrange", 1))
    x = ufl.SpatialCoordinate(msh)
    return nf.RegressionEnergy(u, abs(x[0] - 0.4) * ufl.sin(ufl.pi * x[1]), norm="H1")
"""


def checkpoint_state(folder):
    import torch

    data = torch.load(folder / "checkpoint.pt", weights_only=False)
    return data["flow"]["iteration"], np.asarray(data["flow"]["parameters"]), data["flow"]


def test_resume_continues_to_the_uninterrupted_result(tempdir, capsys):
    """4 iterations, then --resume up to 8 == 8 iterations in one go (module run)."""
    write(tempdir, SEEDED_MODULE, "prob.py")

    def config(folder, iterations, name, seed=0):
        return write(tempdir, f'[problem]\nmodule = "prob.py"\n[flow]\niterations = '
                     f'{iterations}\n[data]\nseed = {seed}\n[output]\nfolder = '
                     f'"{tempdir / folder}"\nquiet = true\ncheckpoint_every = 3\n', name)

    assert cli.main(["run", str(config("full", 8, "full.toml"))]) == 0
    short = config("part", 4, "part4.toml")
    assert cli.main(["run", str(short)]) == 0
    assert checkpoint_state(tempdir / "part")[0] == 4
    # without --resume the checkpoint is not overwritten
    capsys.readouterr()
    # another seed: a run that started afresh would end elsewhere; the resumed one may not
    assert cli.main(["run", str(config("part", 8, "part8.toml", seed=1))]) == 2
    if MPI.COMM_WORLD.rank == 0:
        err = capsys.readouterr().err
        assert "checkpoint.pt exists" in err and "--resume" in err and "output.folder" in err
    assert checkpoint_state(tempdir / "part")[0] == 4
    assert cli.main(["run", str(tempdir / "part8.toml"), "--resume"]) == 0
    it_full, theta_full, flow_full = checkpoint_state(tempdir / "full")
    it_part, theta_part, flow_part = checkpoint_state(tempdir / "part")
    assert it_full == it_part == 8
    np.testing.assert_allclose(theta_part, theta_full, rtol=0, atol=1e-10)
    assert [h["iteration"] for h in flow_part["history"] if h.get("kind") is None] == list(range(8))
    # --resume without a checkpoint starts from iteration 0
    assert cli.main(["run", str(config("fresh", 2, "fresh.toml")), "--resume"]) == 0
    assert checkpoint_state(tempdir / "fresh")[0] == 2


def test_build_must_return_an_energy(tempdir):
    write(tempdir, "def build(comm):\n    return None\n", "none.py")
    cfg = write(tempdir, f'[problem]\nmodule = "none.py"\n[output]\nfolder = "{tempdir / "o"}"'
                '\n', "none.toml")
    with pytest.raises(cli.ConfigError, match=r"build\(comm\) in .*none.py returned None "
                                               r"\(of type NoneType\); it must return an energy"):
        cli.run_module(cli.load_config(cfg))
    assert cli.main(["run", str(cfg)]) == 2
    write(tempdir, "def build():\n    return 1\n", "noarg.py")
    cfg = write(tempdir, '[problem]\nmodule = "noarg.py"\n', "noarg.toml")
    with pytest.raises(cli.ConfigError, match=r"build\(\) in .*noarg.py must take one argument"):
        cli.run_module(cli.load_config(cfg))


def test_paths_resolve_against_the_config_folder(tempdir, monkeypatch):
    """mesh.file relative to the config's folder, output.folder relative to the cwd."""
    (tempdir / "cfgs").mkdir(exist_ok=True) if MPI.COMM_WORLD.rank == 0 else None
    (tempdir / "work").mkdir(exist_ok=True) if MPI.COMM_WORLD.rank == 0 else None
    MPI.COMM_WORLD.Barrier()
    rel = os.path.relpath(ROOT / "meshes" / "lshape.msh", tempdir / "cfgs")
    cfg = write(tempdir / "cfgs", f'[problem]\nmodel = "darcy"\n[mesh]\nfile = "{rel}"\n'
                'observe_tag = 2\n[network]\nwidth = 2\n[flow]\niterations = 1\ntol = 10.0\n'
                '[output]\nfolder = "out"\nquiet = true\n', "lshape.toml")
    monkeypatch.chdir(tempdir / "work")
    assert cli.main(["run", os.path.relpath(cfg)]) == 0
    assert (tempdir / "work" / "out" / "checkpoint.pt").exists()
    # an observe_tag that the mesh does not have lists the available ones
    bad = write(tempdir / "cfgs", cfg.read_text().replace("observe_tag = 2", "observe_tag = 7")
                .replace('"out"', '"out7"'), "tag7.toml")
    with pytest.raises(ValueError, match=r"observe-tag = 7 is not a cell tag of the mesh; "
                                         r"available cell tags: \[1, 2\]"):
        cli.main(["run", str(bad)])


def test_named_model_resume_continues_the_count(tempdir):
    import torch

    def config(iterations, name):
        return write(tempdir, f'[problem]\nmodel = "darcy"\n[mesh]\nn = 6\n[network]\nwidth = 3\n'
                     f'[flow]\niterations = {iterations}\ntol = 10.0\n[output]\nfolder = '
                     f'"{tempdir / "d"}"\nquiet = true\n', name)

    assert cli.main(["run", str(config(2, "d2.toml"))]) == 0
    assert cli.main(["run", str(config(4, "d4.toml"))]) == 2  # would overwrite: refused
    assert cli.main(["run", str(tempdir / "d4.toml"), "--resume"]) == 0
    data = torch.load(tempdir / "d" / "checkpoint.pt", weights_only=False)
    assert data["flow"]["iteration"] == 4
    assert [h["iteration"] for h in data["flow"]["history"] if h.get("kind") is None] == \
        [0, 1, 2, 3]
