"""Communication and memory model of one APT iteration per rank, by process layout.

Pure arithmetic (no MPI, no arrays). Two layouts of ``P = A * S`` ranks (SPEC 8):

- ``S = 1``, **implemented**: angles block-partitioned over ``P = A`` ranks, every
  volume-space array replicated; the sums over angles are Allreduced in complex128.
- ``S > 1``, **modelled as first designed**: ``A`` angle groups times ``S`` z-slabs. Rank
  ``(a, s)`` holds slices ``[s nz/S, (s+1) nz/S)`` of every volume-space array, the angles of
  group ``a``, and the frames of those angles whose window's *top row* lies in its slab.
  The built layout (``reconstruct --slabs``, :mod:`ptmpi.parallel.slab_data_term`) differs
  in the data term: frames stay with the rank that reads them (its own angles) and the
  forward map and the adjoint move whole projections by an Alltoallv transpose within the
  angle group instead of projection-row halos (more bytes at large ``S``: each rank sends
  its slab's rows of all the group's angles, ``n_angles S / P`` angles x ``nz / S`` rows,
  where the halos send about ``M`` rows per local angle); this model still counts halos.

What the designed layout communicates per iteration (each counted below):

- the complex128 Allreduce of the normal operator and of the right-hand side, of slab
  size, among the ``A`` ranks that share a slab (none when ``A = 1``). ``P^H W P`` itself
  needs no halo: a projection row is the sum over one slice (rotation axis along z) and ``W``
  is pointwise in the projection, so it stays in its slab;
- one-slice volume halos (two neighbours x ``n^2`` complex64) for the Laplacian of every
  normal-operator application, the divergence of the right-hand side and the gradient of
  the TV step;
- **projection-row halos** (chosen over an Alltoallv transpose of whole projections): the
  forward map sends each rank the rows below its slab that its frames' windows reach (up to
  ``M - 1`` rows per local angle, from as many following slabs as they span), and the
  adjoint sends the same rows' contributions back to be added; once each per iteration
  (the z-step's forward map, the right-hand side's adjoint);
- scalar Allreduces among the ``S`` slabs of an angle group for CG's dot products, the TV
  statistics and the step norms; and, as in ``S = 1``, the metrics vector and the stop
  flag over all ranks.

Allreduce cost: ``2 (p - 1) / p`` times the buffer sent per rank (ring, or Rabenseifner's
reduce-scatter + allgather: the same bytes), ``2 ceil(log2 p)`` messages (Rabenseifner;
a ring would send ``2 (p - 1)``); small (scalar) Allreduces by recursive doubling,
``ceil(log2 p)`` messages of the payload each. Bytes are those a rank sends (it receives
as many). The per-iteration counts follow ``ptmpi.solvers.admm`` / ``cg``: CG applies the
normal operator ``cg_iterations + 1`` times (the warm-start residual) and takes
``2 + 2 cg_iterations`` dot products. Not counted: setup (power iterations, the Jacobi
diagonal, the illumination ``W`` and its halo), ``--refine-probe``, checkpoints.

Memory per rank: :func:`ptmpi.memory.predict_arrays`' APT coefficients (compiled kernels,
complex64) with ``V`` the rank's slab (``nz/S`` slices) and ``Fb`` its frames (the largest
count over slabs: when slabs are thinner than the scan step some hold no window tops and
others a whole scan row), the projector's sparse matrix per local angle (about ``2.2 n^2``
non-zeros at 78 B, the same for every slice, so it does not shrink with ``S``: it grows with
the angles per rank, ``n_angles S / P``), the input counts, and for ``S > 1`` the halo
buffers (two ghost slices and the projection rows received). The process baseline
(a few hundred MiB) is left out.

:func:`evaluate` (``ptmpi bench --model``) tabulates 1024^3 and 2048^3 with 1500 angles, a
256 px probe and detector, scan step 128 px (50% overlap; 7 x 7 = 49 and 15 x 15 = 225
windows per angle), 8 CG steps, complex64, on 64-4096 ranks, against a per-rank memory
limit (80 GiB: one rank per 80 GB GPU; 256 GiB: one rank per CPU node).
"""

from __future__ import annotations

import math

from ptmpi.memory import predict_arrays

GIB = 2**30
BANDWIDTH = 25e9  # bytes/s per rank (a 200 Gb/s link), for the time estimate only
LATENCY = 2e-6  # s per message, for the time estimate only
COMPLEX_WIDE = 16  # bytes of a complex128 voxel of the Allreduced sums


def scan_grid(volume_shape, probe_size: int, step: int) -> tuple[list[int], int]:
    """Top rows of the scan's window rows and the number of windows per row: a regular grid
    of ``step`` whose windows of ``probe_size`` cover the ``(nz, n)`` projection."""
    nz, _, nx = (int(s) for s in volume_shape)

    def starts(length):
        count = max(1, math.ceil((length - probe_size) / step) + 1)
        return [min(i * step, max(0, length - probe_size)) for i in range(count)]

    return starts(nz), len(starts(nx))


def _slab_bounds(nz: int, slabs: int, s: int) -> tuple[int, int]:
    return s * nz // slabs, (s + 1) * nz // slabs


def _log2(p: int) -> int:
    return math.ceil(math.log2(p)) if p > 1 else 0


def _allreduce(p: int, nbytes: float) -> tuple[float, int]:
    """(bytes sent per rank, messages per rank) of a large Allreduce among ``p`` ranks."""
    return (2 * (p - 1) / p * nbytes, 2 * _log2(p)) if p > 1 else (0.0, 0)


def _small_allreduce(p: int, nbytes: float) -> tuple[float, int]:
    return (_log2(p) * nbytes, _log2(p))


def layout_cost(volume_shape, n_angles: int, probe_size: int, ranks: int, slabs: int,
                step: int | None = None, cg_iterations: int = 8, dtype_bytes: int = 8) -> dict:
    """Memory (bytes) and communication (bytes sent, messages) per rank and APT iteration.

    Parameters
    ----------
    volume_shape : (nz, n, n)
    n_angles : rotation angles (block-partitioned over the ``A = ranks / slabs`` groups).
    probe_size : probe and detector side ``M`` (frames of ``M^2``).
    ranks, slabs : ``P`` and ``S`` (``S`` divides ``P``, ``S <= nz``, ``A <= n_angles``).
    step : scan step in pixels (default ``M / 2``); frames per angle from :func:`scan_grid`.
    cg_iterations : CG steps per ADMM iteration (the solver's default 8).
    dtype_bytes : bytes of a complex voxel of the solver's arrays (8: complex64).

    Returns a dict: the layout (``angle_groups``, ``angles_local``, ``frames_local``,
    ``slab_slices``), ``memory`` (by part and ``total``, bytes; the worst rank), ``comm``
    (bytes sent per rank and iteration by part and ``total``), ``messages`` (by part and
    ``total``, per rank and iteration) and ``seconds`` (an estimate: the bytes at
    :data:`BANDWIDTH` plus the messages at :data:`LATENCY`). The layout ``S > 1`` is a model
    of a design.
    """
    nz, ny, nx = (int(s) for s in volume_shape)
    if ranks < 1 or slabs < 1 or ranks % slabs:
        raise ValueError(f"slabs ({slabs}) must divide ranks ({ranks})")
    if slabs > nz:
        raise ValueError(f"more slabs ({slabs}) than slices ({nz})")
    groups = ranks // slabs
    if groups > n_angles:
        raise ValueError(f"more angle groups ({groups}) than angles ({n_angles})")
    m = int(probe_size)
    step = int(step) if step else max(1, m // 2)
    tops, per_row = scan_grid(volume_shape, m, step)
    angles_local = math.ceil(n_angles / groups)

    # per slab: window tops it owns, rows beyond it its windows reach, slabs those span
    slab_slices = math.ceil(nz / slabs)
    frames_local = halo_rows = halo_msgs = 0
    for s in range(slabs):
        z0, z1 = _slab_bounds(nz, slabs, s)
        own = [t for t in tops if z0 <= t < z1]
        frames_local = max(frames_local, len(own) * per_row * angles_local)
        if own and slabs > 1:
            reach = min(nz, max(own) + m)
            halo_rows = max(halo_rows, reach - z1)
            halo_msgs = max(halo_msgs, sum(1 for q in range(s + 1, slabs)
                                           if _slab_bounds(nz, slabs, q)[0] < reach))

    # memory (the worst rank): predict_arrays on the rank's slab and frames
    pred = predict_arrays((slab_slices, ny, nx), frames_local, m, angles_local, "apt",
                          dtype="complex64" if dtype_bytes == 8 else "complex128",
                          compiled=True)
    memory = {"solver": pred["solver"], "projector": pred["projector"], "input": pred["input"],
              "halo": 0}
    if slabs > 1:
        memory["halo"] = (2 * ny * nx + angles_local * halo_rows * nx) * dtype_bytes
    memory["total"] = sum(memory.values())

    normal_apps = cg_iterations + 1
    comm, msgs = {}, {}
    # complex128 sums of the normal operator and the right-hand side, among the A ranks of
    # a slab (all ranks when S = 1)
    b, k = _allreduce(groups, COMPLEX_WIDE * slab_slices * ny * nx)
    comm["allreduce"], msgs["allreduce"] = (normal_apps + 1) * b, (normal_apps + 1) * k
    # metrics vector (4 float64) and stop flag, over all ranks
    b1, k1 = _small_allreduce(ranks, 32)
    b2, k2 = _small_allreduce(ranks, 8)
    comm["metrics"], msgs["metrics"] = b1 + b2, k1 + k2
    comm["volume_halo"] = msgs["volume_halo"] = 0
    comm["projection_halo"] = msgs["projection_halo"] = 0
    comm["scalars"] = msgs["scalars"] = 0
    if slabs > 1:
        exchanges = normal_apps + 2  # Laplacians, divergence (rhs), gradient (TV step)
        comm["volume_halo"] = exchanges * 2 * ny * nx * dtype_bytes
        msgs["volume_halo"] = exchanges * 2
        comm["projection_halo"] = 2 * angles_local * halo_rows * nx * dtype_bytes
        msgs["projection_halo"] = 2 * halo_msgs
        # CG dot products, TV statistics (3 floats), step norms (3 floats) over the slabs
        dots = 2 + 2 * cg_iterations
        bd, kd = _small_allreduce(slabs, 8)
        bs, ks = _small_allreduce(slabs, 24)
        comm["scalars"], msgs["scalars"] = dots * bd + 2 * bs, dots * kd + 2 * ks
    comm["total"] = sum(comm.values())
    msgs["total"] = sum(msgs.values())
    seconds = comm["total"] / BANDWIDTH + msgs["total"] * LATENCY
    return {"ranks": ranks, "slabs": slabs, "angle_groups": groups,
            "angles_local": angles_local, "frames_local": frames_local,
            "frames_per_angle": len(tops) * per_row, "slab_slices": slab_slices,
            "halo_rows": halo_rows, "seconds": seconds, "memory": memory, "comm": comm,
            "messages": msgs}


def layouts(volume_shape, n_angles: int, probe_size: int, ranks: int, **kw) -> list[dict]:
    """:func:`layout_cost` of every power-of-two ``S`` with ``S | P``, ``S <= nz`` and at most
    one angle group per angle."""
    nz = int(volume_shape[0])
    out, s = [], 1
    while s <= min(ranks, nz):
        if ranks % s == 0 and ranks // s <= n_angles:
            out.append(layout_cost(volume_shape, n_angles, probe_size, ranks, s, **kw))
        s *= 2
    return out


def evaluate(sizes=(1024, 2048), n_angles: int = 1500, probe_size: int = 256,
             ranks=tuple(2**k for k in range(6, 13)), limit_bytes: float = 80 * GIB,
             **kw) -> list[dict]:
    """Per size and rank count: ``S = 1`` (when ``P <= n_angles``), the ``S`` of least memory
    and the ``S`` that fits ``limit_bytes`` with the fewest bytes sent (``None`` if none
    fits)."""
    rows = []
    for n in sizes:
        for p in ranks:
            all_s = layouts((n, n, n), n_angles, probe_size, p, **kw)
            one = next((c for c in all_s if c["slabs"] == 1), None)
            least_memory = min(all_s, key=lambda c: c["memory"]["total"])
            fits = [c for c in all_s if c["memory"]["total"] <= limit_bytes]
            best = min(fits, key=lambda c: (c["comm"]["total"], c["slabs"])) if fits else None
            rows.append({"n": n, "ranks": p, "s1": one, "least_memory": least_memory,
                         "best": best, "layouts": all_s})
    return rows


def _gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def _s(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.2f}"


def _mb(x: float) -> str:
    return f"{x / 1e6:,.0f}" if x >= 1e6 else f"{x / 1e6:.2f}"


def crossover(rows: list[dict], n: int) -> int | None:
    """Smallest rank count of size ``n`` from which on the best feasible layout has slabs."""
    ps = [r for r in rows if r["n"] == n]
    for i, r in enumerate(ps):
        if all(q["best"] is not None and q["best"]["slabs"] > 1 for q in ps[i:]):
            return r["ranks"]
    return None


def format_model(rows: list[dict], limit_bytes: float = 80 * GIB) -> str:
    """Markdown tables of :func:`evaluate`'s rows, one per size (time: bytes at
    :data:`BANDWIDTH` plus messages at :data:`LATENCY`, an estimate)."""
    out = []
    for n in sorted({r["n"] for r in rows}):
        first = rows[[r["n"] for r in rows].index(n)]["layouts"][0]
        out.append(f"**{n}^3**, {first['frames_per_angle']} frames per angle "
                   f"(memory GiB per rank, MB sent per rank and iteration; limit "
                   f"{limit_bytes / GIB:.0f} GiB)\n")
        out.append("| ranks | S=1: memory | S=1: MB sent (s) | least memory: S, GiB | "
                   "best feasible S | its memory | its MB sent (allreduce / halos) | "
                   "its messages | its time (s) |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for r in (q for q in rows if q["n"] == n):
            one, lm, b = r["s1"], r["least_memory"], r["best"]
            s1 = (f"{_gib(one['memory']['total'])}"
                  f"{'' if one['memory']['total'] <= limit_bytes else ' (too big)'}",
                  f"{_mb(one['comm']['total'])} ({_s(one['seconds'])})") if one else (
                      "- (P > angles)", "-")
            best = ("none fits", "-", "-", "-", "-") if b is None else (
                f"{b['slabs']} (A = {b['angle_groups']})", _gib(b["memory"]["total"]),
                f"{_mb(b['comm']['total'])} ({_mb(b['comm']['allreduce'])} / "
                f"{_mb(b['comm']['volume_halo'] + b['comm']['projection_halo'])})",
                str(b["messages"]["total"]), _s(b["seconds"]))
            out.append(f"| {r['ranks']} | {s1[0]} | {s1[1]} | {lm['slabs']}, "
                       f"{_gib(lm['memory']['total'])} | " + " | ".join(best) + " |")
        c = crossover(rows, n)
        these = [q for q in rows if q["n"] == n]
        s1_fits = any(q["s1"] and q["s1"]["memory"]["total"] <= limit_bytes for q in these)
        fewer = all(c2["comm"]["total"] < q["s1"]["comm"]["total"] for q in these if q["s1"]
                    for c2 in q["layouts"] if c2["slabs"] > 1)
        out.append("")
        if c is None:
            out.append("Crossover: none in this range.")
        elif s1_fits:
            out.append(f"Crossover: the best feasible layout has slabs from {c} ranks on.")
        else:
            out.append(f"Crossover: S = 1 never fits {limit_bytes / GIB:.0f} GiB; slabs fit "
                       f"from {c} ranks on.")
        if fewer:
            out.append("On bytes alone every S > 1 sends less than S = 1 at every rank "
                       "count where S = 1 exists.")
        out.append("")
    return "\n".join(out)
