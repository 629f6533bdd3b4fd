"""Generate the demo meshes with gmsh (run once; the .msh files are committed).

    python meshes/make_meshes.py [--h 0.04]

square_inclusion.msh -- unit square; cells tagged 1 (background) and 2 (a disc of
    radius 0.25 at (0.3, 0.5): the observation subdomain); boundary facets tagged 10.
lshape.msh -- L-shaped domain [0,1]^2 minus [0.5,1]^2; cells tagged 1, with the strip
    y < 0.25 tagged 2 (observations); outer boundary facets 10, re-entrant edges 11.
"""

import argparse
import pathlib

import gmsh

HERE = pathlib.Path(__file__).parent


def square_inclusion(h: float) -> None:
    gmsh.model.add("square_inclusion")
    occ = gmsh.model.occ
    sq = occ.addRectangle(0, 0, 0, 1, 1)
    disc = occ.addDisk(0.3, 0.5, 0, 0.25, 0.25)
    out, _ = occ.fragment([(2, sq)], [(2, disc)])
    occ.synchronize()
    surfaces = [t for d, t in out if d == 2]
    inner = [s for s in surfaces if abs(occ.getMass(2, s) - 3.14159265 * 0.25**2) < 1e-3]
    outer = [s for s in surfaces if s not in inner]
    gmsh.model.addPhysicalGroup(2, outer, 1, name="background")
    gmsh.model.addPhysicalGroup(2, inner, 2, name="observed")
    bnd = gmsh.model.getBoundary([(2, s) for s in surfaces], oriented=False, combined=True)
    gmsh.model.addPhysicalGroup(1, [t for _, t in bnd], 10, name="boundary")
    gmsh.option.setNumber("Mesh.CharacteristicLengthMax", h)
    gmsh.model.mesh.generate(2)
    gmsh.write(str(HERE / "square_inclusion.msh"))


def lshape(h: float) -> None:
    gmsh.model.add("lshape")
    occ = gmsh.model.occ
    big = occ.addRectangle(0, 0, 0, 1, 1)
    cut = occ.addRectangle(0.5, 0.5, 0, 0.5, 0.5)
    L, _ = occ.cut([(2, big)], [(2, cut)])
    strip = occ.addRectangle(0, 0, 0, 1, 0.25)
    out, _ = occ.fragment(L, [(2, strip)])
    occ.synchronize()
    surfaces = [t for d, t in out if d == 2]
    low = [s for s in surfaces if occ.getCenterOfMass(2, s)[1] < 0.25]
    gmsh.model.addPhysicalGroup(2, [s for s in surfaces if s not in low], 1, name="domain")
    gmsh.model.addPhysicalGroup(2, low, 2, name="observed")
    bnd = gmsh.model.getBoundary([(2, s) for s in surfaces], oriented=False, combined=True)
    reentrant, outer = [], []
    for _, c in bnd:
        x, y, _ = occ.getCenterOfMass(1, c)
        (reentrant if (abs(x - 0.5) < 1e-9 and y > 0.5) or (abs(y - 0.5) < 1e-9 and x > 0.5)
         else outer).append(c)
    gmsh.model.addPhysicalGroup(1, outer, 10, name="outer")
    gmsh.model.addPhysicalGroup(1, reentrant, 11, name="reentrant")
    gmsh.option.setNumber("Mesh.CharacteristicLengthMax", h)
    gmsh.model.mesh.generate(2)
    gmsh.write(str(HERE / "lshape.msh"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--h", type=float, default=0.04, help="largest cell size")
    args = parser.parse_args()
    gmsh.initialize()
    gmsh.option.setNumber("General.Terminal", 0)
    square_inclusion(args.h)
    lshape(args.h)
    gmsh.finalize()
