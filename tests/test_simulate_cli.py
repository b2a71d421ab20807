"""Simulated files against SPEC 2 recomputed independently, and the CLI's behaviour."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from ptmpi.cli import main


def _run(*args, timeout=120):
    """Run ``python -m ptmpi ARGS`` as a user would; returns (code, stdout, stderr, seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ptmpi", *args], capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - t0


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sim") / "small.h5"
    code = main(["simulate", "-o", str(path), "--n", "24", "--nz", "20", "--angles", "4",
                 "--step", "6", "--probe-size", "12", "--fwhm", "4", "--eta", "50"])
    assert code == 0
    return path


def test_simulated_intensities_match_spec2_recomputed_at_0_and_90_degrees(small_file):
    with h5py.File(small_file, "r") as f:
        counts = f["entry_1/instrument_1/detector_1/data"][...]
        assert f["entry_1/instrument_1/detector_1/data"].attrs.get("is_fft_shifted", 0) == 0
        probe = f["entry_1/instrument_1/source_1/probe"][...]
        u = f["entry_1/ptmpi/truth/volume"][...].astype(np.complex128)
        truth_probe = f["entry_1/ptmpi/truth/probe"][...]
        pos = f["entry_1/ptmpi/positions_px"][...].astype(int)
        off = f["entry_1/ptmpi/frame_offset"][...]
        angles = f["entry_1/ptmpi/angles_deg"][...]
    assert np.array_equal(probe, truth_probe)
    assert angles.tolist() == [0.0, 45.0, 90.0, 135.0]
    nz, n, _ = u.shape
    m = probe.shape[0]
    # SPEC 1 orientation cases, done by hand: theta = 0 sums over y, theta = 90 over x.
    for a, projection in ((0, u.sum(axis=1)), (2, u.sum(axis=2))):
        padded = np.zeros((nz + 2 * m, n + 2 * m), complex)
        padded[m:-m, m:-m] = projection
        worst = 0.0
        for j in range(off[a], off[a + 1]):
            r, c = pos[j]
            window = padded[m + r : m + r + m, m + c : m + c + m]
            clean = np.abs(np.fft.fft2(probe * window, norm="ortho")) ** 2
            expected = np.fft.fftshift(clean)  # stored centered
            # Poisson counts with the probe scaled by sqrt(eta): mean = clean, var = clean.
            z = (counts[j] - expected) / np.sqrt(np.maximum(expected, 1.0))
            worst = max(worst, float(np.abs(z).max()))
            assert abs(counts[j].sum() - expected.sum()) < 6 * np.sqrt(expected.sum())
        assert worst < 6.0


def test_noise_free_counts_equal_the_model_exactly(tmp_path):
    path = tmp_path / "clean.h5"
    assert main(["simulate", "-o", str(path), "--n", "16", "--angles", "2", "--step", "4",
                 "--probe-size", "8", "--fwhm", "3"]) == 0
    with h5py.File(path, "r") as f:
        counts = f["entry_1/instrument_1/detector_1/data"][...]
        probe = f["entry_1/instrument_1/source_1/probe"][...]
        u = f["entry_1/ptmpi/truth/volume"][...].astype(np.complex128)
        pos = f["entry_1/ptmpi/positions_px"][...].astype(int)
        off = f["entry_1/ptmpi/frame_offset"][...]
    m = probe.shape[0]
    proj = u.sum(axis=1)  # angle 0
    padded = np.zeros((16 + 2 * m, 16 + 2 * m), complex)
    padded[m:-m, m:-m] = proj
    for j in range(off[0], off[1]):
        r, c = pos[j]
        window = padded[m + r : m + r + m, m + c : m + c + m]
        expected = np.fft.fftshift(np.abs(np.fft.fft2(probe * window, norm="ortho")) ** 2)
        assert np.allclose(counts[j], expected, rtol=2e-4, atol=1e-3 * expected.max())


def test_simulate_preset_then_info(tmp_path):
    path = tmp_path / "x.h5"
    code, _, err, seconds = _run("simulate", "--preset", "paper-s32-a12", "-o", str(path))
    assert code == 0, err
    code, out, err, _ = _run("info", str(path))
    assert code == 0, err
    assert "(128, 128, 128)" in out and "angles: 12" in out and "300 in all" in out
    # the existing file is not overwritten without --force, and stays intact
    before = path.stat().st_mtime_ns
    code, _, err, _ = _run("simulate", "--preset", "demo", "-o", str(path))
    assert code == 1 and "exists" in err and "--force" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert path.stat().st_mtime_ns == before


def _corrupt(src: Path, dst: Path, edit) -> Path:
    dst.write_bytes(src.read_bytes())
    with h5py.File(dst, "r+") as f:
        edit(f)
    return dst


def _negative_counts(f):
    f["entry_1/instrument_1/detector_1/data"][1, 2, 3] = -5.0


def _zero_probe(f):
    f["entry_1/instrument_1/source_1/probe"][...] = 0


def _bad_offset(f):
    off = f["entry_1/ptmpi/frame_offset"]
    values = off[...]
    values[-1] += 3
    off[...] = values


def _missing_positions(f):
    del f["entry_1/ptmpi/positions_px"]


@pytest.mark.parametrize("edit,words", [
    (_negative_counts, ["detector_1/data", "negative"]),
    (_zero_probe, ["probe", "zero"]),
    (_bad_offset, ["frame_offset"]),
    (_missing_positions, ["positions_px", "missing"]),
])
def test_info_rejects_bad_file_with_one_line(small_file, tmp_path, edit, words):
    bad = _corrupt(small_file, tmp_path / "bad.h5", edit)
    code, _, err, seconds = _run("info", str(bad))
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0].lower() or word in lines[0], lines[0]
    assert seconds < 30


def test_info_on_garbage_and_missing_files(tmp_path):
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not an hdf5 file" * 10)
    for path in (garbage, tmp_path / "missing.h5"):
        code, _, err, _ = _run("info", str(path))
        assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_info_reports_real_siemens_star_as_2d(capsys, siemens_path):
    assert main(["info", str(siemens_path)]) == 0
    out = capsys.readouterr().out
    assert "2-D" in out and "516" in out


def test_demo_refuses_foreign_file_but_replaces_its_own(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    assert main(["demo", "--out", str(out_dir), "--iterations", "2"]) == 0
    out = capsys.readouterr().out
    assert "SNR" in out and "R-factor" in out
    assert main(["demo", "--out", str(out_dir), "--iterations", "2"]) == 0  # its own files
    assert (out_dir / "demo-apt.h5").exists() and (out_dir / "demo-apt-slices.png").exists()
    for name in ("demo.h5", "demo-apt.h5"):
        foreign = tmp_path / f"foreign-{name}"
        foreign.mkdir()
        (foreign / name).write_bytes(b"user data")
        assert main(["demo", "--out", str(foreign), "--iterations", "2"]) == 1
        assert (foreign / name).read_bytes() == b"user data"


def test_bad_simulation_settings_are_one_line_errors(tmp_path):
    code, _, err, _ = _run("simulate", "-o", str(tmp_path / "y.h5"), "--n", "16",
                           "--probe-size", "32")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "probe" in err.lower()
    code, _, err, _ = _run("simulate", "-o", str(tmp_path / "y.h5"), "--preset", "nope")
    assert code == 1 and "unknown preset" in err
    assert not (tmp_path / "y.h5").exists()
    assert os.listdir(tmp_path) == []
