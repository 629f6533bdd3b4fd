# # Nonlinear inversion: -div(k grad y) + y^3 = f, Newton forward solves
#
# The Darcy inversion with a nonlinear state equation: every forward solve is a Newton
# iteration, the adjoint is linearized at the converged state, and the derivative
# with respect to k comes from the same UFL residual. Runs demo_darcy_inversion.py
# with --nonlinear (all of its options apply; outputs in out_nonlinear_inversion/).
#
#     mpirun -n 2 python demos/demo_nonlinear_inversion.py --expand

import pathlib
import runpy
import sys

sys.argv = [sys.argv[0], "--nonlinear", "--out", "out_nonlinear_inversion", *sys.argv[1:]]
runpy.run_path(str(pathlib.Path(__file__).with_name("demo_darcy_inversion.py")),
               run_name="__main__")
