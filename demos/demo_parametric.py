# # Parametric model reduction: mu -> u(mu) from FE snapshots
#
# The Poisson problem -Δu = f_mu in (0,1)², u = 0 on the boundary, with a Gaussian
# source centred at mu = (mu_1, mu_2) in [0.3, 0.7]², is solved by P1 finite elements
# for a grid of training parameters (the snapshots u_h(mu_i)). One network
# N(x, y, mu_1, mu_2), multiplied by x(1-x)y(1-y) so that the Dirichlet condition holds
# exactly, is fitted to all snapshots at once by the natural-gradient flow of
#
#     E(theta) = 1/S sum_i 1/2 ||u_theta(.; mu_i) - u_h(mu_i)||²_{H1}
#
# in the product metric H1^S (G = 1/S sum_i J_i^T A_H1 J_i). The surrogate is then
# evaluated at unseen test parameters and compared with Adam on the same network and
# with the linear reduced basis (POD-Galerkin, whose energy-norm error is the
# energy-norm projection error onto the POD space of the training snapshots). A
# moving source has a slowly decaying Kolmogorov width: the nonlinear surrogate
# reaches with a few hundred weights what POD needs many modes for.
#
#     mpirun -n 2 python demos/demo_parametric.py

import nngf_fem as nf  # noqa: I001  (first: load order for the pip DOLFINx wheel)

import argparse
import pathlib
import time

import numpy as np
import torch
import ufl
from dolfinx import fem, mesh
from dolfinx.fem.petsc import apply_lifting, assemble_matrix, assemble_vector, create_vector, set_bc
from petsc4py import PETSc
from tqdm.auto import tqdm
from mpi4py import MPI

parser = argparse.ArgumentParser(description="Parametric surrogate mu -> u(mu) from snapshots")
parser.add_argument("--n", type=int, default=24, help="cells per side")
parser.add_argument("--train", type=int, default=4, help="training grid: train x train samples")
parser.add_argument("--test", type=int, default=8, help="random test parameters")
parser.add_argument("--sigma", type=float, default=0.12, help="width of the Gaussian source")
parser.add_argument("--width", type=int, default=20)
parser.add_argument("--depth", type=int, default=2)
parser.add_argument("--iterations", type=int, default=100)
parser.add_argument("--metric", default="H1", choices=["H1", "L2", "Euclidean"])
parser.add_argument("--expand", action="store_true", help="start from 4 neurons per layer, grow")
parser.add_argument("--eps-min", type=float, default=1e-6, help="smallest damping")
parser.add_argument("--nystrom-rank", type=int, default=64)
parser.add_argument("--adam", action="store_true", help="also train with Adam (same budget)")
parser.add_argument("--adam-lr", type=float, default=3e-3)
parser.add_argument("--pod", default="2,4,8", help="POD dimensions to compare with")
parser.add_argument("--tol", type=float, default=0.1, help="asserted mean relative test error")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", default="out_parametric")
parser.add_argument("--checkpoint-every", type=int, default=20)
parser.add_argument("--resume", action="store_true")
parser.add_argument("--quiet", action="store_true")
args = parser.parse_args()

comm = MPI.COMM_WORLD
t_start = time.perf_counter()
msh = mesh.create_unit_square(comm, args.n, args.n)
V = fem.functionspace(msh, ("Lagrange", 1))
x = ufl.SpatialCoordinate(msh)

# ---------------------------------------------------------------- snapshots (FE)
mu_c = fem.Constant(msh, np.zeros(2))
source = 1.0 / (2 * np.pi * args.sigma**2) * ufl.exp(
    -((x[0] - mu_c[0]) ** 2 + (x[1] - mu_c[1]) ** 2) / (2 * args.sigma**2))
u_t, v_t = ufl.TrialFunction(V), ufl.TestFunction(V)
a_form = fem.form(ufl.inner(ufl.grad(u_t), ufl.grad(v_t)) * ufl.dx)
L_form = fem.form(source * v_t * ufl.dx(metadata={"quadrature_degree": 6}))
msh.topology.create_connectivity(1, 2)
bc = fem.dirichletbc(0.0, fem.locate_dofs_topological(
    V, 1, mesh.exterior_facet_indices(msh.topology)), V)
A = assemble_matrix(a_form, bcs=[bc])
A.assemble()
fe_solver = nf.KrylovSolver(A, petsc_options_prefix="snapshot_",
                            defaults={"ksp_type": "preonly", "pc_type": "lu",
                                      "pc_factor_mat_solver_type": "mumps"})
b = create_vector(V)  # ghosted, as assemble_vector needs


def snapshot(mu, name):
    """FE solution u_h(mu)."""
    mu_c.value[:] = mu
    with b.localForm() as loc:
        loc.set(0.0)
    assemble_vector(b, L_form)
    apply_lifting(b, [a_form], [[bc]])
    b.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
    set_bc(b, [bc])
    u = fem.Function(V, name=name)
    fe_solver.solve(b, u.x.petsc_vec)
    u.x.scatter_forward()
    return u


g1 = np.linspace(0.3, 0.7, args.train)
mus_train = np.array([[a, c] for a in g1 for c in g1])
mus_test = np.random.default_rng(args.seed + 1).uniform(0.3, 0.7, size=(args.test, 2))
t0 = time.perf_counter()
train = [snapshot(mu, f"u_h_{i}") for i, mu in enumerate(mus_train)]
test = [snapshot(mu, f"u_h_test_{i}") for i, mu in enumerate(mus_test)]
t_snap = time.perf_counter() - t0
fe_solver.destroy()
b.destroy()

# energy (H1_0 seminorm) error helpers, on the FE matrix A (Dirichlet rows are identity
# rows; all compared fields vanish there)
_x, _y = A.createVecs()


def energy_inner(u: fem.Function, w: fem.Function) -> float:
    A.mult(u.x.petsc_vec, _y)
    return _y.dot(w.x.petsc_vec)


def rel_error(u: fem.Function, ref: fem.Function) -> float:
    d = fem.Function(V)
    d.x.array[:] = u.x.array - ref.x.array
    return float(np.sqrt(max(energy_inner(d, d), 0.0) / energy_inner(ref, ref)))


# ---------------------------------------------------------------- the surrogate
def bubble(xx):
    return 16.0 * xx[:, 0] * (1 - xx[:, 0]) * xx[:, 1] * (1 - xx[:, 1])


def build(width):
    torch.manual_seed(args.seed)
    field = nf.ParametricField(V, nf.MLP(4, width=width, depth=args.depth), mus_train,
                               factor=bubble, name="u")
    energy = nf.ParametricRegressionEnergy(field, train, norm="H1")
    metric = {"H1": nf.H1, "L2": nf.L2, "Euclidean": nf.Euclidean}[args.metric]
    return field, energy, nf.ProductMetric(field, metric)


def test_errors(field) -> np.ndarray:
    return np.array([rel_error(field.predict(mu), ref)
                     for mu, ref in zip(mus_test, test, strict=True)])


def train_errors(field) -> np.ndarray:
    return np.array([rel_error(s.function, ref)
                     for s, ref in zip(field.samples, train, strict=True)])


field, energy, metric = build(4 if args.expand else args.width)
flow = nf.NaturalGradientFlow(energy, metric, eps=1e-4, max_step=1e4, eps_min=args.eps_min,
                              nystrom_rank=args.nystrom_rank,
                              petsc_options_prefix="ng_param_")
flow.checkpoint_meta.update({"demo": "parametric", "n": args.n, "seed": args.seed})
policy = nf.ExpansionPolicy(threshold=0.5, patience=3, neurons=4,
                            max_params=args.depth * args.width * (args.width + 5) + args.width + 1
                            ) if args.expand else None
out = pathlib.Path(args.out)
ckpt = out / "checkpoint.pt"
if args.resume and ckpt.exists():
    nf.load_checkpoint(ckpt, flow)
t0 = time.perf_counter()


def monitor(fl, rec):
    """Training/test errors every 10 iterations; expansion."""
    if (rec["iteration"] + 1) % 10 == 0 or rec["iteration"] + 1 == args.iterations:
        rec["train_error"] = float(np.mean(train_errors(field)))
        rec["test_error"] = float(np.mean(test_errors(field)))
        if comm.rank == 0 and not args.quiet:
            tqdm.write(f"it {rec['iteration'] + 1:4d}  E {rec['energy']:.3e}  "
                       f"train {rec['train_error']:.3e}  test {rec['test_error']:.3e}  "
                       f"align {rec['alignment']:.2f}  P {rec['n_params']}")
    rec["wall"] = time.perf_counter() - t0
    if policy is not None and policy.should_expand(fl):
        e = policy.expand(fl)
        if comm.rank == 0 and not args.quiet:
            tqdm.write(f"     it {e['iteration']}: expand ({e['kind']}) {e['params_before']} -> "
                       f"{e['params_after']} parameters")


flow.run(args.iterations, callback=monitor, checkpoint=str(ckpt),
         checkpoint_every=args.checkpoint_every, progress=not args.quiet)
t_ng = time.perf_counter() - t0
err_train, err_test = train_errors(field), test_errors(field)
rows = [("natural gradient " + args.metric + ("-expansive" if args.expand else ""),
         field.num_params, float(err_train.mean()), float(err_test.mean()),
         float(err_test.max()), t_ng)]

# ---------------------------------------------------------------- Adam, same network
if args.adam:
    f2, e2, m2 = build(args.width)
    m2.destroy()
    t0 = time.perf_counter()
    nf.TorchOptimizerFlow(e2, "adam", lr=args.adam_lr).run(args.iterations)
    rows.append(("Adam", f2.num_params, float(train_errors(f2).mean()),
                 float(test_errors(f2).mean()), float(test_errors(f2).max()),
                 time.perf_counter() - t0))

# ---------------------------------------------------------------- POD-Galerkin
S = len(train)
C = np.array([[energy_inner(ui, uj) for uj in train] for ui in train])
lam, Q = np.linalg.eigh(C)
lam, Q = lam[::-1], Q[:, ::-1]
for r in [int(s) for s in args.pod.split(",") if s]:
    if r > S:
        continue
    t0 = time.perf_counter()
    # orthonormal (energy inner product) POD modes phi_k = sum_i Q_ik u_i / sqrt(lam_k)
    modes = []
    for k in range(r):
        phi = fem.Function(V)
        phi.x.array[:] = sum(Q[i, k] * train[i].x.array for i in range(S)) / np.sqrt(lam[k])
        modes.append(phi)

    def pod(u_ref, modes=modes):
        p = fem.Function(V)
        p.x.array[:] = sum(energy_inner(u_ref, phi) * phi.x.array for phi in modes)
        return p

    e_tr = np.array([rel_error(pod(u), u) for u in train])
    e_te = np.array([rel_error(pod(u), u) for u in test])
    rows.append((f"POD-Galerkin r={r}", r, float(e_tr.mean()), float(e_te.mean()),
                 float(e_te.max()), time.perf_counter() - t0))

# ---------------------------------------------------------------- outputs
u_pred = field.predict(mus_test[0], name="u_network")
u_ref = test[0]
u_ref.name = "u_fe"
nf.io.write_history(out, flow.history, comm, meta={
    "demo": "parametric", "args": vars(args), "mus_train": mus_train, "mus_test": mus_test,
    "table": [dict(zip(("method", "size", "train_error", "test_error", "test_error_max",
                        "wall"), r, strict=True)) for r in rows]})
nf.io.plot_history(out / "history.png", flow.history, comm, extra=("test_error",))
nf.io.write_fields(out / "fields.bp", [u_ref, u_pred])
mu_s = f"({mus_test[0][0]:.2f}, {mus_test[0][1]:.2f})"
nf.io.plot_fields(out / "prediction.png", [(f"FE u_h(mu={mu_s})", u_ref),
                                           ("network u(mu)", u_pred)])
if comm.rank == 0:
    print(f"\nParametric Poisson, moving source: P1 on {args.n}x{args.n} "
          f"({V.dofmap.index_map.size_global} dofs), {S} training / {len(test)} test "
          f"parameters, {comm.size} rank(s); snapshots {t_snap:.1f} s")
    print("relative H1_0 errors (mean over parameters; max over test)")
    print(f"{'method':<28}{'size':>6}{'train':>11}{'test':>11}{'test max':>11}{'wall [s]':>10}")
    for name, size, etr, ete, emax, wall in rows:
        print(f"{name:<28}{size:>6d}{etr:>11.3e}{ete:>11.3e}{emax:>11.3e}{wall:>10.2f}")
    print(f"(size: network parameters, or POD dimension)  total {time.perf_counter() - t_start:.1f}"
          f" s\noutputs in {out}/: prediction.png, history.{{png,json,csv}}, fields.bp (ParaView)")
E = [h["energy"] for h in flow.history if h.get("kind") is None]
assert all(b1 <= a1 for a1, b1 in zip(E, E[1:], strict=False)), "energy increased"
assert err_test.mean() <= args.tol, f"mean test error {err_test.mean():.3e} > {args.tol}"
for o in (_x, _y, A):
    o.destroy()
flow.destroy()
metric.destroy()
