"""Reconstruct the real Siemens star with pty-chi's LSQML and score it with ptmpi's R-factor.

Measurement only: pty-chi (``pip install ptychi``, with a CPU build of torch) is not a
dependency of ptmpi or of its tests. The script calls pty-chi's public API with its LSQML
defaults (amplitude-Gaussian noise model, SGD step 1 for object and probe), minibatch 96,
probe refined, fixed positions, and maps the result into ptmpi's frame:

- the object array is ptmpi's image (same shape, ``read_input``'s frame); pty-chi takes
  the positions of the probe *centres* relative to an origin pixel, so the origin is set
  to ``((M - 1) / 2, (M - 1) / 2)`` and the positions are ptmpi's window corners: both
  place each window at the same pixels (sub-pixel parts by a Fourier shift in both);
- pty-chi's far field is the unnormalised FFT, ptmpi's the unitary one: its probe times
  ``M`` is ptmpi's probe.

The R-factor is then :func:`ptmpi.metrics.r_factor` of ``F(omega * S_j v)`` through ptmpi's
operators, as for a ptmpi run.

Usage: ``python docs/ptychi_star.py siemens-star-small.h5 [--epochs 100] [-o ptychi.npz]``
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    import ptychi.api as api
    import torch
    from ptychi.api.task import PtychographyTask

    from ptmpi.io.cxi import read_input
    from ptmpi.metrics import r_factor
    from ptmpi.operators.fft import FarField
    from ptmpi.operators.ptycho import Ptycho

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=96)
    parser.add_argument("--round-positions", action="store_true",
                        help="round the positions to whole pixels (both engines)")
    parser.add_argument("-o", "--output", help="save object, probe, positions (npz)")
    args = parser.parse_args()

    torch.set_default_device("cpu")
    data = read_input(args.input, 0, 1)
    m = data.probe.shape[-1]
    positions = data.positions_local
    if args.round_positions:
        positions = np.round(positions)
    counts = data.counts_local  # zero frequency at [0, 0], as pty-chi's model predicts

    options = api.LSQMLOptions()
    options.data_options.data = counts
    options.data_options.fft_shift = False
    options.object_options.initial_guess = torch.ones((1, *data.image_shape),
                                                      dtype=torch.complex64)
    options.object_options.pixel_size_m = 1.0
    options.object_options.determine_position_origin_coords_by = (
        api.ObjectPosOriginCoordsMethods.SPECIFIED)
    options.object_options.position_origin_coords = [(m - 1) / 2, (m - 1) / 2]
    options.probe_options.initial_guess = data.probe[None, None]
    options.probe_options.optimizable = True
    options.probe_position_options.position_y_px = positions[:, 0]
    options.probe_position_options.position_x_px = positions[:, 1]
    options.probe_position_options.optimizable = False
    options.reconstructor_options.batch_size = args.batch_size
    options.reconstructor_options.num_epochs = args.epochs

    start = time.perf_counter()
    task = PtychographyTask(options)
    task.run()
    wall = time.perf_counter() - start
    image = task.get_data_to_cpu("object", as_numpy=True)[0]
    probe = task.get_data_to_cpu("probe", as_numpy=True)[0, 0] * m  # unitary-FFT scale

    ptycho = Ptycho(probe.astype(np.complex64), positions, data.frame_offset_local,
                    image.shape)
    model = FarField().fwd(ptycho.fwd(image[None].astype(np.complex64)))
    r = r_factor(model, counts)
    print(f"pty-chi LSQML, {args.epochs} epochs, minibatch {args.batch_size}: "
          f"R-factor {r:.4f} (ptmpi's definition), {wall:.1f} s")
    if args.output:
        np.savez(args.output, image=image, probe=probe, positions_px=positions, r_factor=r,
                 wall_s=wall)


if __name__ == "__main__":
    main()
