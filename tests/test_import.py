"""``ptmpi import``: per-angle CXI files (SPEC 8) into one SPEC 3 file, and back.

Per-angle files are written from simulated data by ``write_per_angle_cxi`` (or
``simulate --export-cxi``); the import must give back the simulated positions, angles,
mask and counts. Expected positions are recomputed here from SPEC 8's words (the probe's
centre pixel ``m // 2`` at ``(x, y)`` from the image centre ``((nz-1)/2, (n-1)/2)``).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys

import h5py
import numpy as np
import pytest

from jobs import job_env, mpiexec
from ptmpi.cli import main
from ptmpi.io import importer
from ptmpi.io.cxi import read_input
from ptmpi.io.importer import IMPORT_GROUP, MASK, ImportFailure, import_cxi
from ptmpi.io.per_angle import (
    CXI_ANGLE,
    CXI_DATA,
    CXI_ENERGY,
    CXI_ILLUMINATION,
    CXI_MASK,
    CXI_TRANSLATIONS,
    Conventions,
    object_pixel_size,
    write_per_angle_cxi,
)
from ptmpi.io.validate import validate_input
from ptmpi.sim.presets import SimulationSettings
from ptmpi.sim.simulate import simulate

SETTINGS = SimulationSettings(n=24, nz=20, n_angles=3, step=6, probe_size=8, fwhm=3.0,
                              eta=50.0, seed=3)


@pytest.fixture(scope="module")
def sim():
    return simulate(SETTINGS)


def _arrays(sim, positions=None) -> dict:
    return dict(counts=sim.counts, probe=sim.probe,
                positions_px=sim.positions_px if positions is None else positions,
                frame_offset=sim.frame_offset, angles_deg=sim.angles_deg,
                volume_shape=sim.volume.shape)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------------- round trip


def test_simulate_export_then_import_gives_back_the_simulated_file(tmp_path):
    sim_path, cxi, out = tmp_path / "sim.h5", tmp_path / "cxi", tmp_path / "imp.h5"
    assert main(["simulate", "-o", str(sim_path), "--n", "24", "--nz", "20", "--angles", "3",
                 "--step", "6", "--probe-size", "8", "--fwhm", "3", "--eta", "50",
                 "--export-cxi", str(cxi)]) == 0
    files = sorted(cxi.glob("*.cxi"))
    assert [f.name for f in files] == ["angle-000.cxi", "angle-001.cxi", "angle-002.cxi"]
    assert main(["import", *map(str, files), "-o", str(out), "--volume-shape", "20", "24",
                 "24"]) == 0
    ref, got = read_input(sim_path), read_input(out)
    assert got.volume_shape == (20, 24, 24)
    assert np.array_equal(got.angles_deg, [0.0, 60.0, 120.0])
    assert np.array_equal(got.frame_offset, ref.frame_offset)
    assert np.abs(got.positions_local - ref.positions_local).max() < 1e-9
    assert np.array_equal(got.counts_local, ref.counts_local)
    assert np.array_equal(got.probe, ref.probe)
    assert got.energy == pytest.approx(10e3 * 1.602176634e-19, rel=1e-15)
    assert (got.distance, got.pixel_size) == (2.0, 75e-6)
    assert validate_input(out) == []
    assert main(["info", str(out)]) == 0


def test_round_trip_with_one_mask_keeps_counts_mask_and_provenance(tmp_path, sim, rng):
    m = SETTINGS.probe_size
    mask = (rng.random((m, m)) < 0.1).astype(np.uint32) * 3  # any nonzero marks invalid
    files = write_per_angle_cxi(tmp_path / "cxi", **_arrays(sim), mask=mask)
    out = tmp_path / "imp.h5"
    summary = import_cxi(files, out, volume_shape=sim.volume.shape)
    assert summary.mask_shape == (m, m)
    with h5py.File(out, "r") as f:
        stored = f[MASK][()]
        counts = f[CXI_DATA][()]
        names = [s.decode() for s in f[f"{IMPORT_GROUP}/source_files"][()]]
        sums = [s.decode() for s in f[f"{IMPORT_GROUP}/source_sha256"][()]]
        pixel = f[f"{IMPORT_GROUP}/object_pixel_size"][()]
    assert stored.dtype == np.uint32 and np.array_equal(stored, mask)
    valid = mask == 0
    assert np.array_equal(counts[:, valid], sim.counts[:, valid])
    assert np.all(counts[:, ~valid] == 0)  # masked pixels are stored as 0
    assert names == [p.name for p in files]
    assert sums == ["sha256:" + hashlib.sha256(p.read_bytes()).hexdigest() for p in files]
    # lambda = hc/E = 1.23984198e-10 m at 10 keV; pixel = lambda * 2 m / (8 * 75 um)
    assert pixel == pytest.approx(1.2398419843320026e-10 * 2.0 / (8 * 75e-6), rel=1e-12)


def test_masks_differing_between_angles_are_stored_per_angle(tmp_path, sim, rng):
    m, a = SETTINGS.probe_size, SETTINGS.n_angles
    masks = (rng.random((a, m, m)) < 0.2).astype(np.uint32)
    files = write_per_angle_cxi(tmp_path / "cxi", **_arrays(sim), mask=masks)
    with h5py.File(files[2], "r+") as f:  # a file without a mask: all pixels valid
        del f[CXI_MASK]
    out = tmp_path / "imp.h5"
    assert import_cxi(files, out, volume_shape=sim.volume.shape).mask_shape == (a, m, m)
    with h5py.File(out, "r") as f:
        stored = f[MASK][()]
    assert np.array_equal(stored[:2], masks[:2]) and not stored[2].any()


def test_frames_are_streamed_one_file_at_a_time(tmp_path, sim, monkeypatch):
    files = write_per_angle_cxi(tmp_path / "cxi", **_arrays(sim))
    calls = []
    real = importer.read_counts

    def counting(header):
        counts = real(header)
        calls.append((header.path, counts.shape[0]))
        return counts

    monkeypatch.setattr(importer, "read_counts", counting)
    import_cxi(files, tmp_path / "imp.h5", volume_shape=sim.volume.shape)
    per_angle = np.diff(sim.frame_offset).tolist()
    assert calls == [(str(p), k) for p, k in zip(files, per_angle, strict=True)]


def test_corner_zero_counts_and_mask_are_centered(tmp_path, sim):
    m = SETTINGS.probe_size
    mask = np.zeros((m, m), np.uint32)
    mask[m // 2, m // 2 + 1] = 1  # one pixel next to the zero frequency (centered)
    files = write_per_angle_cxi(tmp_path / "cxi", **_arrays(sim), mask=mask)
    for p in files:  # store them as tike does: zero frequency at [0, 0]
        with h5py.File(p, "r+") as f:
            f[CXI_DATA][...] = np.fft.ifftshift(f[CXI_DATA][()], axes=(-2, -1))
            f[CXI_DATA].attrs["is_fft_shifted"] = 1
            f[CXI_MASK][...] = np.fft.ifftshift(f[CXI_MASK][()])
    out = tmp_path / "imp.h5"
    import_cxi(files, out, volume_shape=sim.volume.shape)
    with h5py.File(out, "r") as f:
        assert f[CXI_DATA].attrs["is_fft_shifted"] == 0
        counts, stored = f[CXI_DATA][()], f[MASK][()]
    assert np.array_equal(stored, mask)
    expected = sim.counts.copy()
    expected[:, m // 2, m // 2 + 1] = 0
    assert np.array_equal(counts, expected)


# ---------------------------------------------------------------------------- positions


def test_sub_pixel_positions_are_kept(tmp_path, sim, rng):
    positions = sim.positions_px + rng.uniform(-0.5, 0.5, sim.positions_px.shape)
    files = write_per_angle_cxi(tmp_path / "cxi", **_arrays(sim, positions))
    out = tmp_path / "imp.h5"
    import_cxi(files, out, volume_shape=sim.volume.shape)
    with h5py.File(out, "r") as f:
        got = f["entry_1/ptmpi/positions_px"][()]
    assert np.abs(got - positions).max() < 1e-9
    assert np.abs(got - np.rint(got)).max() > 0.3  # not rounded


def test_translation_follows_spec8_written_by_hand(tmp_path, sim):
    """The files' translations, checked against SPEC 8's words independently of the code."""
    files = write_per_angle_cxi(tmp_path / "cxi", **_arrays(sim), energy=1.2e-15,
                                distance=3.0, pixel_size=55e-6)
    nz, n, _ = sim.volume.shape
    m = SETTINGS.probe_size
    pixel = 6.62607015e-34 * 299792458.0 / 1.2e-15 * 3.0 / (m * 55e-6)
    with h5py.File(files[1], "r") as f:
        xyz = f[CXI_TRANSLATIONS[0]][()]
    own = sim.positions_px[sim.frame_offset[1]:sim.frame_offset[2]]
    centre_col = own[:, 1] + m // 2  # the probe's centre pixel, in image columns
    centre_row = own[:, 0] + m // 2
    assert np.allclose(xyz[:, 0] / pixel, centre_col - (n - 1) / 2, rtol=0, atol=1e-9)
    assert np.allclose(xyz[:, 1] / pixel, centre_row - (nz - 1) / 2, rtol=0, atol=1e-9)
    assert np.all(xyz[:, 2] == 0)


def test_flips_and_axis_offset(tmp_path, sim, capsys):
    files = list(map(str, write_per_angle_cxi(tmp_path / "cxi", **_arrays(sim))))
    nz, n, _ = sim.volume.shape
    m = SETTINGS.probe_size
    out = tmp_path / "flip.h5"
    assert main(["import", *files, "-o", str(out), "--volume-shape", str(nz), str(n), str(n),
                 "--flip-x", "--flip-y", "--axis-offset", "2.25"]) == 0
    with h5py.File(out, "r") as f:
        got = f["entry_1/ptmpi/positions_px"][()]
        attrs = dict(f[IMPORT_GROUP].attrs)
    # Flipping mirrors each probe centre pixel about the image centre; the axis offset
    # then moves every centre 2.25 columns toward lower columns.
    row0, col0 = sim.positions_px[:, 0] + m // 2, sim.positions_px[:, 1] + m // 2
    assert np.abs(got[:, 0] + m // 2 - ((nz - 1) - row0)).max() < 1e-9
    assert np.abs(got[:, 1] + m // 2 - ((n - 1) - col0 - 2.25)).max() < 1e-9
    assert (attrs["flip_x"], attrs["flip_y"], attrs["axis_offset_px"]) == (1, 1, 2.25)
    # the axis offset alone
    plain = import_cxi(files, tmp_path / "axis.h5", volume_shape=(nz, n, n),
                       conventions=Conventions(axis_offset_px=-1.5))
    with h5py.File(plain.output, "r") as f:
        got = f["entry_1/ptmpi/positions_px"][()]
    assert np.abs(got - (sim.positions_px + [0.0, 1.5])).max() < 1e-9


def test_derived_volume_shape_is_the_smallest_holding_every_window(tmp_path, sim):
    files = write_per_angle_cxi(tmp_path / "cxi", **_arrays(sim))
    summary = import_cxi(files, tmp_path / "imp.h5")
    nz, n, n2 = summary.volume_shape
    m = SETTINGS.probe_size
    assert n == n2 and (nz, n) != (20, 24)  # the simulated windows hang over the edges
    positions = read_input(summary.output).positions_local
    # every window whole inside the image ...
    assert positions.min() >= 0
    assert positions[:, 0].max() + m <= nz and positions[:, 1].max() + m <= n
    # ... and one pixel less on either axis would not hold them (the centre moves by 1/2)
    rows, cols = positions[:, 0] - 0.5, positions[:, 1] - 0.5
    assert rows.min() < 0 or rows.max() + m > nz - 1
    assert cols.min() < 0 or cols.max() + m > n - 1
    # same positions relative to each other as simulated: a shift by the centre change
    shift = positions - sim.positions_px
    assert np.allclose(shift, [(nz - 20) / 2, (n - 24) / 2], rtol=0, atol=1e-9)


def test_translation_read_from_data_1(tmp_path, sim):
    files = write_per_angle_cxi(tmp_path / "cxi", **_arrays(sim))
    for p in files:
        with h5py.File(p, "r+") as f:
            f[CXI_TRANSLATIONS[1]] = f[CXI_TRANSLATIONS[0]][()]
            del f[CXI_TRANSLATIONS[0]]
    import_cxi(files, tmp_path / "imp.h5", volume_shape=sim.volume.shape)
    got = read_input(tmp_path / "imp.h5").positions_local
    assert np.abs(got - sim.positions_px).max() < 1e-9


# ---------------------------------------------------------------------------- one file, angles


def test_single_file_of_one_angle(tmp_path, sim, capsys):
    files = write_per_angle_cxi(tmp_path / "cxi", **_arrays(sim))
    out = tmp_path / "one.h5"
    assert main(["import", str(files[2]), "-o", str(out), "--volume-shape", "20", "24",
                 "24"]) == 0
    got = read_input(out)
    f0, f1 = sim.frame_offset[2], sim.frame_offset[3]
    assert got.angles_deg.tolist() == [120.0]
    assert got.frame_offset.tolist() == [0, f1 - f0]
    assert np.array_equal(np.fft.fftshift(got.counts_local, axes=(-2, -1)), sim.counts[f0:f1])
    assert np.abs(got.positions_local - sim.positions_px[f0:f1]).max() < 1e-9
    assert main(["info", str(out)]) == 0


def test_angles_given_on_the_command_line_replace_the_files(tmp_path, sim, capsys):
    files = write_per_angle_cxi(tmp_path / "cxi", **_arrays(sim))
    for p in files:
        with h5py.File(p, "r+") as f:
            del f[CXI_ANGLE]
    out = tmp_path / "imp.h5"
    assert main(["import", *map(str, files), "-o", str(out)]) == 1
    line = _one_error_line(capsys)
    assert f"{files[0]}: {CXI_ANGLE}: required dataset is missing" in line
    assert main(["import", *map(str, files), "-o", str(out), "--angles-deg",
                 "1.5,-30,181"]) == 0
    assert read_input(out).angles_deg.tolist() == [1.5, -30.0, 181.0]
    capsys.readouterr()
    assert main(["import", *map(str, files), "-o", str(tmp_path / "x.h5"),
                 "--angles-deg", "1,2"]) == 1
    assert "expected 3 finite angles" in _one_error_line(capsys)


def test_probe_from_file_when_no_input_has_one(tmp_path, sim, capsys):
    files = write_per_angle_cxi(tmp_path / "cxi", **_arrays(sim))
    for p in files:
        with h5py.File(p, "r+") as f:
            del f[CXI_ILLUMINATION]
    out = tmp_path / "imp.h5"
    assert main(["import", *map(str, files), "-o", str(out)]) == 1
    line = _one_error_line(capsys)
    assert f"{files[0]}: {CXI_ILLUMINATION}:" in line and "--probe" in line
    probe = (2.0 * sim.probe).astype(np.complex64)
    np.save(tmp_path / "probe.npy", probe[None])  # one leading mode axis
    assert main(["import", *map(str, files), "-o", str(out), "--probe",
                 str(tmp_path / "probe.npy")]) == 0
    assert np.array_equal(read_input(out).probe, probe)


# ---------------------------------------------------------------------------- refusals


def _copy_files(sim, tmp_path):
    return write_per_angle_cxi(tmp_path / "cxi", **_arrays(sim))


def test_mismatching_energy_is_refused_naming_file_and_dataset(tmp_path, sim, capsys):
    files = _copy_files(sim, tmp_path)
    with h5py.File(files[1], "r+") as f:
        f[CXI_ENERGY][()] = 1.1 * f[CXI_ENERGY][()]
    out = tmp_path / "imp.h5"
    assert main(["import", *map(str, files), "-o", str(out)]) == 1
    line = _one_error_line(capsys)
    assert line.startswith(f"ptmpi import: error: {files[1]}: {CXI_ENERGY}: expected ")
    assert str(files[0]) in line
    assert not out.exists()


def test_mismatching_detector_size_is_refused(tmp_path, sim, capsys):
    files = _copy_files(sim, tmp_path)
    with h5py.File(files[2], "r+") as f:
        frames = f[CXI_DATA].shape[0]
        del f[CXI_DATA]
        f[CXI_DATA] = np.zeros((frames, 10, 10), np.float32)
    assert main(["import", *map(str, files), "-o", str(tmp_path / "imp.h5")]) == 1
    line = _one_error_line(capsys)
    assert f"{files[2]}: {CXI_DATA}: expected 8x8 frames as in {files[0]}, found 10x10" in line


def test_counts_that_are_not_3d_are_refused(tmp_path, sim, capsys):
    files = _copy_files(sim, tmp_path)
    with h5py.File(files[0], "r+") as f:
        del f[CXI_DATA]
        f[CXI_DATA] = np.zeros((5, 64), np.float32)
    assert main(["import", *map(str, files), "-o", str(tmp_path / "imp.h5")]) == 1
    assert _one_error_line(capsys).endswith(
        f"{files[0]}: {CXI_DATA}: expected 3-D counts (F, m, m), found shape (5, 64)")


def test_translation_rows_must_match_the_frames(tmp_path, sim):
    files = _copy_files(sim, tmp_path)
    with h5py.File(files[1], "r+") as f:
        xyz = f[CXI_TRANSLATIONS[0]][()]
        del f[CXI_TRANSLATIONS[0]]
        f[CXI_TRANSLATIONS[0]] = xyz[:-1]
    with pytest.raises(ImportFailure, match=f"{files[1]}: {CXI_TRANSLATIONS[0]}: expected "
                                            f"\\({xyz.shape[0]}, 3\\)"):
        import_cxi(files, tmp_path / "imp.h5")


def test_negative_counts_only_where_masked(tmp_path, sim):
    m = SETTINGS.probe_size
    mask = np.zeros((m, m), np.uint32)
    mask[0, 0] = 1
    files = write_per_angle_cxi(tmp_path / "cxi", **_arrays(sim), mask=mask)
    with h5py.File(files[1], "r+") as f:
        f[CXI_DATA][:, 0, 0] = -1.0  # a detector's fill value at a masked pixel: fine
    import_cxi(files, tmp_path / "ok.h5", volume_shape=sim.volume.shape)
    assert validate_input(tmp_path / "ok.h5") == []
    with h5py.File(files[1], "r+") as f:
        f[CXI_DATA][3, 2, 5] = -1.0  # at a valid pixel: refused
    with pytest.raises(ImportFailure, match=f"{files[1]}: {CXI_DATA}: .*first in frame 3\\)"):
        import_cxi(files, tmp_path / "bad.h5", volume_shape=sim.volume.shape)
    assert not (tmp_path / "bad.h5").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_window_outside_a_given_volume_is_refused(tmp_path, sim):
    files = _copy_files(sim, tmp_path)
    with pytest.raises(ImportFailure, match="entirely outside"):
        import_cxi(files, tmp_path / "imp.h5", volume_shape=sim.volume.shape,
                   conventions=Conventions(axis_offset_px=40.0))


def test_existing_output_is_refused_without_force(tmp_path, sim, capsys):
    files = list(map(str, _copy_files(sim, tmp_path)))
    out = tmp_path / "imp.h5"
    out.write_bytes(b"keep me")
    assert main(["import", *files, "-o", str(out)]) == 1
    line = _one_error_line(capsys)
    assert "exists" in line and "--force" in line
    assert out.read_bytes() == b"keep me"
    assert main(["import", *files, "-o", str(out), "--force"]) == 0
    assert validate_input(out) == []
    capsys.readouterr()
    # an input file is never the output, even with --force
    assert main(["import", *files, "-o", files[0], "--force"]) == 1
    assert "is the input file" in _one_error_line(capsys)


def test_missing_non_hdf5_and_truncated_inputs(tmp_path, sim, capsys):
    (tmp_path / "junk.cxi").write_text("not hdf5")
    assert main(["import", str(tmp_path / "nope.cxi"), "-o", str(tmp_path / "a.h5")]) == 1
    assert "nope.cxi: file does not exist" in _one_error_line(capsys)
    assert main(["import", str(tmp_path / "junk.cxi"), "-o", str(tmp_path / "a.h5")]) == 1
    assert "junk.cxi: not a readable HDF5 file" in _one_error_line(capsys)
    whole = write_per_angle_cxi(tmp_path / "cxi", **_arrays(sim))[0].read_bytes()
    (tmp_path / "cut.cxi").write_bytes(whole[: len(whole) // 2])
    assert main(["import", str(tmp_path / "cut.cxi"), "-o", str(tmp_path / "a.h5")]) == 1
    assert f"{tmp_path / 'cut.cxi'}: " in _one_error_line(capsys)
    assert not (tmp_path / "a.h5").exists()


def test_export_geometry_round_trips_for_other_constants(tmp_path, sim):
    kw = dict(energy=2.0e-15, distance=0.8, pixel_size=172e-6)
    files = write_per_angle_cxi(tmp_path / "cxi", **_arrays(sim), **kw)
    summary = import_cxi(files, tmp_path / "imp.h5", volume_shape=sim.volume.shape)
    m = SETTINGS.probe_size
    assert summary.object_pixel_size == pytest.approx(object_pixel_size(2.0e-15, 0.8, m, 172e-6))
    got = read_input(summary.output)
    assert np.abs(got.positions_local - sim.positions_px).max() < 1e-9
    assert (got.energy, got.distance, got.pixel_size) == (2.0e-15, 0.8, 172e-6)


def test_units_attribute_is_honoured(tmp_path, sim):
    files = _copy_files(sim, tmp_path)
    for p in files:
        with h5py.File(p, "r+") as f:
            energy = f[CXI_ENERGY][()]
            f[CXI_ENERGY][()] = energy / 1.602176634e-19 / 1e3
            f[CXI_ENERGY].attrs["units"] = "keV"
    summary = import_cxi(files, tmp_path / "imp.h5", volume_shape=sim.volume.shape)
    assert np.abs(read_input(summary.output).positions_local - sim.positions_px).max() < 1e-9
    with h5py.File(files[0], "r+") as f:
        f[CXI_ENERGY].attrs["units"] = "furlong"
    with pytest.raises(ImportFailure, match=f"{files[0]}: {CXI_ENERGY}: expected @units"):
        import_cxi(files, tmp_path / "bad.h5")



def test_import_under_mpiexec_two_ranks(tmp_path, sim):
    """Rank 0 imports, the other rank waits; a refusal is one line and exit status 1."""
    files = list(map(str, _copy_files(sim, tmp_path)))
    out = tmp_path / "imp.h5"
    cmd = [mpiexec(), "-n", "2", sys.executable, "-m", "ptmpi", "import", *files, "-o", str(out),
           "--volume-shape", "20", "24", "24"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=job_env())
    assert done.returncode == 0, done.stderr
    assert np.abs(read_input(out).positions_local - sim.positions_px).max() < 1e-9
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=job_env())
    assert again.returncode == 1
    lines = again.stderr.strip().splitlines()
    assert lines == [f"ptmpi import: error: {out}: output exists; pass --force to overwrite it"]
