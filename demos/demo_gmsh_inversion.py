# # Inversion on a gmsh mesh with partial observations
#
# The Darcy inversion on the L-shaped gmsh mesh of meshes/ (physical markers for the
# boundary and an observation strip, see meshes/make_meshes.py): the state is observed
# only on the cells tagged 2, read in serial and in parallel by nngf_fem.meshes.load_msh.
# Runs demo_darcy_inversion.py with --mesh meshes/lshape.msh --observe-tag 2 (all of
# its options apply; outputs in out_gmsh_inversion/).
#
#     mpirun -n 2 python demos/demo_gmsh_inversion.py --iterations 60

import pathlib
import runpy
import sys

here = pathlib.Path(__file__).resolve().parent
sys.argv = [sys.argv[0], "--mesh", str(here.parent / "meshes" / "lshape.msh"),
            "--observe-tag", "2", "--tol", "0.2", "--out", "out_gmsh_inversion", *sys.argv[1:]]
runpy.run_path(str(here / "demo_darcy_inversion.py"), run_name="__main__")
