"""Input file (SPEC 3): layout, reading by angle block, conventions, validation, info."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from ptmpi.io.cxi import (
    DATA,
    FRAME_OFFSET,
    POSITIONS,
    PROBE,
    input_checksum,
    read_input,
    write_input,
)
from ptmpi.io.info import info_lines, main_info
from ptmpi.io.validate import ValidationError, check_input, validate_input

NZ, N, M = 20, 24, 8
FRAMES_PER_ANGLE = [3, 4, 0, 2, 5]  # an angle without frames is legal (non-decreasing offsets)


def make_dataset(rng: np.random.Generator) -> dict:
    """Arrays of a small random but valid 3-D dataset (centered counts)."""
    offsets = np.concatenate([[0], np.cumsum(FRAMES_PER_ANGLE)]).astype(np.int64)
    n_frames = int(offsets[-1])
    # Windows may hang over the edge by up to M-1 pixels (SPEC 2) and still be valid.
    rows = rng.integers(-M + 1, NZ, n_frames)
    cols = rng.integers(-M + 1, N, n_frames)
    return dict(
        counts=rng.poisson(5.0, (n_frames, M, M)).astype(np.float32),
        probe=(rng.standard_normal((M, M)) + 1j * rng.standard_normal((M, M))).astype(
            np.complex64),
        positions_px=np.stack([rows, cols], axis=1).astype(np.float64),
        frame_offset=offsets,
        angles_deg=np.linspace(0.0, 180.0, len(FRAMES_PER_ANGLE), endpoint=False),
        volume_shape=(NZ, N, N),
    )


@pytest.fixture
def dataset(rng) -> dict:
    return make_dataset(rng)


@pytest.fixture
def valid_file(tmp_path, dataset) -> Path:
    path = tmp_path / "data.h5"
    write_input(path, **dataset)
    return path


def only_problem(path, *args) -> str:
    problems = validate_input(path, *args)
    assert len(problems) == 1, problems
    return problems[0]


# ---------------------------------------------------------------------------- writing


def test_layout_matches_spec(tmp_path, dataset):
    path = tmp_path / "full.h5"
    truth = np.ones((NZ, N, N), np.complex64)
    write_input(path, **dataset, truth_volume=truth, truth_probe=dataset["probe"],
                energy=1.6e-15, distance=2.0, pixel_size=75e-6)
    n_frames = sum(FRAMES_PER_ANGLE)
    with h5py.File(path, "r") as f:
        assert f["cxi_version"][()] == 160
        assert f["entry_1"].attrs["NX_class"] == "NXentry"
        data = f[DATA]
        assert data.shape == (n_frames, M, M) and data.dtype == np.float32
        assert data.chunks == (1, M, M)
        assert data.attrs["is_fft_shifted"] == 0 and data.attrs["units"] == "counts"
        assert f.get("/entry_1/data_1/data", getlink=True).path == DATA
        np.testing.assert_array_equal(f["/entry_1/data_1/data"][()], dataset["counts"])
        assert f[PROBE].dtype == np.complex64 and f[PROBE].shape == (M, M)
        grp = f["/entry_1/ptmpi"]
        assert grp.attrs["NX_class"] == "NXcollection" and grp.attrs["layout_version"] == 1
        assert grp["volume_shape"].dtype == np.int64
        assert tuple(grp["volume_shape"][()]) == (NZ, N, N)
        assert grp["angles_deg"].dtype == np.float64 and grp["angles_deg"].attrs["units"] == "deg"
        assert grp["frame_offset"].dtype == np.int64
        assert grp["frame_offset"].shape == (len(FRAMES_PER_ANGLE) + 1,)
        assert grp["positions_px"].shape == (n_frames, 2)
        assert grp["positions_px"].attrs["units"] == "pixel"
        assert grp["truth/volume"].shape == (NZ, N, N)
        for name, unit in (("source_1/energy", "J"), ("detector_1/distance", "m"),
                           ("detector_1/x_pixel_size", "m")):
            assert f[f"/entry_1/instrument_1/{name}"].attrs["units"] == unit


def test_overwrite_is_refused_and_nothing_is_lost(tmp_path, dataset):
    path = tmp_path / "data.h5"
    write_input(path, **dataset)
    before = input_checksum(path)
    changed = {**dataset, "counts": dataset["counts"] + 1}
    with pytest.raises(FileExistsError, match="overwrite"):
        write_input(path, **changed)
    assert input_checksum(path) == before
    write_input(path, **changed, overwrite=True)
    assert input_checksum(path) != before
    np.testing.assert_array_equal(read_input(path).counts_local,
                                  np.fft.ifftshift(changed["counts"], axes=(-2, -1)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.h5"]  # no temporary left


def test_inconsistent_arrays_write_nothing(tmp_path, dataset):
    path = tmp_path / "bad.h5"
    with pytest.raises(ValueError, match="probe"):
        write_input(path, **{**dataset, "probe": np.ones((M + 1, M + 1))})
    with pytest.raises(ValueError, match="frame_offset"):
        write_input(path, **{**dataset, "frame_offset": dataset["frame_offset"][::-1]})
    assert list(tmp_path.iterdir()) == []


def test_checksum_is_stable_and_content_sensitive(tmp_path, dataset):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    write_input(a, **dataset)
    b.write_bytes(a.read_bytes())
    assert input_checksum(a) == input_checksum(b)
    assert input_checksum(a).startswith("sha256:") and len(input_checksum(a)) == 7 + 64
    with open(b, "r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last[0] ^ 1]))
    assert input_checksum(a) != input_checksum(b)


# ---------------------------------------------------------------------------- reading


def test_blocks_of_angles_reassemble_the_whole(valid_file, dataset):
    whole = read_input(valid_file)
    expected = np.fft.ifftshift(dataset["counts"], axes=(-2, -1))
    np.testing.assert_array_equal(whole.counts_local, expected)
    assert whole.counts_local.dtype == np.float32
    assert (whole.n_angles, whole.n_frames, whole.m) == (5, sum(FRAMES_PER_ANGLE), M)
    assert not whole.is_2d and whole.volume_shape == (NZ, N, N) and whole.image_shape == (NZ, N)
    np.testing.assert_array_equal(whole.position_shift, [0.0, 0.0])
    assert whole.probe.shape == (M, M) and whole.probe.dtype == np.complex64
    np.testing.assert_array_equal(whole.probe, dataset["probe"])

    counts, positions, n_per_angle = [], [], []
    for start, stop in [(0, 2), (2, 3), (3, 3), (3, 5)]:
        block = read_input(valid_file, start, stop)
        assert (block.angle_start, block.angle_stop) == (start, stop)
        np.testing.assert_array_equal(block.angles_deg, dataset["angles_deg"])
        np.testing.assert_array_equal(block.frame_offset, dataset["frame_offset"])
        assert block.frame_offset_local[0] == 0
        assert block.frame_offset_local[-1] == block.counts_local.shape[0]
        assert block.frame_offset_local.dtype == np.int64
        counts.append(block.counts_local)
        positions.append(block.positions_local)
        n_per_angle.extend(np.diff(block.frame_offset_local))
    np.testing.assert_array_equal(np.concatenate(counts), expected)
    np.testing.assert_array_equal(np.concatenate(positions), dataset["positions_px"])
    assert n_per_angle == FRAMES_PER_ANGLE


def test_truth_is_read_only_on_request(tmp_path, dataset):
    path = tmp_path / "truth.h5"
    truth = (np.arange(NZ * N * N).reshape(NZ, N, N) * (1 + 1j)).astype(np.complex64)
    write_input(path, **dataset, truth_volume=truth, truth_probe=dataset["probe"])
    plain = read_input(path)
    assert plain.truth_volume is None and plain.truth_probe is None
    data = read_input(path, 1, 2, read_truth=True)
    np.testing.assert_array_equal(data.truth_volume, truth)
    np.testing.assert_array_equal(data.truth_probe, dataset["probe"])
    assert read_input(tmp_path / "truth.h5", read_truth=True).truth_volume.dtype == np.complex64


@pytest.mark.parametrize("m", [8, 7])
def test_centered_delta_reads_at_zero_frequency(tmp_path, dataset, m):
    """A delta at [m//2, m//2] (centered file) or at [0, 0] (corner file) reads at [0, 0]."""
    n_frames = sum(FRAMES_PER_ANGLE)
    probe = np.ones((m, m), np.complex64)
    for shifted, where in ((0, (m // 2, m // 2)), (1, (0, 0))):
        counts = np.zeros((n_frames, m, m), np.float32)
        counts[:, where[0], where[1]] = 7.0
        path = tmp_path / f"delta-{shifted}.h5"
        write_input(path, **{**dataset, "counts": counts, "probe": probe},
                    is_fft_shifted=shifted)
        got = read_input(path, 1, 2).counts_local
        assert got.shape == (FRAMES_PER_ANGLE[1], m, m)
        assert np.all(got[:, 0, 0] == 7.0) and got.sum() == 7.0 * got.shape[0]
        assert read_input(path).is_fft_shifted == shifted


def test_absent_fft_shift_attribute_means_centered(valid_file, dataset):
    with h5py.File(valid_file, "r+") as f:
        del f[DATA].attrs["is_fft_shifted"]
    np.testing.assert_array_equal(read_input(valid_file).counts_local,
                                  np.fft.ifftshift(dataset["counts"], axes=(-2, -1)))


def test_2d_dataset_image_from_positions(tmp_path, dataset):
    path = tmp_path / "flat.h5"
    positions = dataset["positions_px"] * 3 - 40.3
    write_input(path, **{**dataset, "positions_px": positions, "volume_shape": None})
    data = read_input(path, 1, 4, margin=5)
    assert data.is_2d and data.volume_shape is None
    # Whole-pixel shift: the sub-pixel part of every position is kept.
    np.testing.assert_array_equal(data.position_shift, np.round(data.position_shift))
    every = read_input(path, margin=5).positions_local
    np.testing.assert_allclose(every.min(axis=0), 5 + (-40.3 % 1), atol=1e-9)
    assert np.all(np.rint(every) + M + 5 <= np.array(data.image_shape))
    np.testing.assert_allclose(np.array(data.image_shape), np.ceil(every.max(axis=0) + M + 5))
    f0, f1 = dataset["frame_offset"][1], dataset["frame_offset"][4]
    np.testing.assert_allclose(data.positions_local, positions[f0:f1] + data.position_shift)
    assert validate_input(path) == []


def test_empty_block_reads_metadata_only(valid_file):
    data = read_input(valid_file, 2, 2)
    assert data.counts_local.shape == (0, M, M) and data.positions_local.shape == (0, 2)
    np.testing.assert_array_equal(data.frame_offset_local, [0])
    with pytest.raises(ValueError, match=r"angle block \[4, 9\)"):
        read_input(valid_file, 4, 9)


def test_real_siemens_file_reads_as_2d(siemens_path):
    data = read_input(siemens_path)
    assert data.is_2d and data.volume_shape is None
    assert (data.n_angles, data.n_frames, data.m) == (1, 516, 128)
    assert data.probe.shape == (128, 128) and data.probe.dtype == np.complex64
    assert data.counts_local.shape == (516, 128, 128) and data.counts_local.dtype == np.float32
    assert data.is_fft_shifted == 1
    assert np.abs(np.sum(np.abs(data.probe) ** 2) - 51.8) < 0.1  # README: sum |p|^2 = 51.8
    rounded = np.rint(data.positions_local)
    assert rounded.min() >= 16
    assert np.all(rounded.max(axis=0) + 128 + 16 <= np.array(data.image_shape))
    np.testing.assert_array_equal(data.frame_offset_local, [0, 516])
    with h5py.File(siemens_path, "r") as f:
        # Corner-zero file: counts are returned as stored.
        np.testing.assert_array_equal(data.counts_local[3], f[DATA][3])
    assert validate_input(siemens_path) == []


def test_real_siemens_info_says_2d(capsys, siemens_path):
    assert main_info(siemens_path) == 0
    out, err = capsys.readouterr()
    assert "2-D ptychography dataset (single angle, no volume_shape)" in out
    assert "probe: 128 x 128" in out and "is_fft_shifted = 1" in out
    assert err == ""


# ---------------------------------------------------------------------------- validation


def test_valid_file_has_no_problems(valid_file):
    assert validate_input(valid_file) == []
    check_input(valid_file)


def test_non_integer_positions_are_not_a_problem(tmp_path, dataset):
    path = tmp_path / "subpixel.h5"
    write_input(path, **{**dataset, "positions_px": dataset["positions_px"] + 0.3})
    assert validate_input(path) == []


def test_negative_counts(valid_file):
    with h5py.File(valid_file, "r+") as f:
        f[DATA][5, 1, 2] = -3.0
        f[DATA][8, 0, 0] = -1.0
    line = only_problem(valid_file)
    assert DATA in line and "non-negative" in line and "2 negative" in line
    assert "frame 5" in line and "-3" in line


def test_nan_counts(valid_file):
    with h5py.File(valid_file, "r+") as f:
        f[DATA][4, 3, 3] = np.nan
    line = only_problem(valid_file)
    assert DATA in line and "finite" in line and "frame 4" in line


def test_counts_are_checked_only_in_the_block(valid_file):
    with h5py.File(valid_file, "r+") as f:
        f[DATA][10, 0, 0] = -1.0  # frame 10 belongs to angle 4 (frames 9..13)
    assert validate_input(valid_file, 0, 4) == []
    assert validate_input(valid_file, 0, 0) == []
    assert "frame 10" in only_problem(valid_file, 4, 5)


def test_zero_probe(valid_file):
    with h5py.File(valid_file, "r+") as f:
        f[PROBE][...] = 0
    line = only_problem(valid_file)
    assert PROBE in line and "all zeros" in line


def test_frame_offset_not_ending_at_f(valid_file):
    with h5py.File(valid_file, "r+") as f:
        f[FRAME_OFFSET][5] = 13
    line = only_problem(valid_file)
    assert FRAME_OFFSET in line and "F = 14" in line and "found 13" in line


def test_frame_offset_decreasing(valid_file):
    with h5py.File(valid_file, "r+") as f:
        f[FRAME_OFFSET][2] = 2  # [0, 3, 2, 7, 9, 14]
    line = only_problem(valid_file)
    assert FRAME_OFFSET in line and "non-decreasing" in line and "3 -> 2" in line


def test_missing_positions(valid_file):
    with h5py.File(valid_file, "r+") as f:
        del f[POSITIONS]
    line = only_problem(valid_file)
    assert POSITIONS in line and "missing" in line


def test_probe_size_differs_from_frame_size(valid_file):
    with h5py.File(valid_file, "r+") as f:
        del f[PROBE]
        f[PROBE] = np.ones((M - 2, M - 2), np.complex64)
    line = only_problem(valid_file)
    assert PROBE in line and f"expected shape ({M}, {M})" in line and f"({M - 2}, {M - 2})" in line


def test_window_outside_the_image(valid_file):
    with h5py.File(valid_file, "r+") as f:
        f[POSITIONS][6] = [NZ + 3, 2.0]
    line = only_problem(valid_file)
    assert POSITIONS in line and "frame 6" in line and "outside" in line
    assert f"{NZ}x{N}" in line


def test_probe_larger_than_volume(tmp_path, dataset):
    path = tmp_path / "small.h5"
    write_input(path, **{**dataset, "volume_shape": (M - 1, N, N)})
    line = only_problem(path)
    assert "volume_shape" in line and f"m = {M}" in line


def test_truncated_file(valid_file):
    size = valid_file.stat().st_size
    with open(valid_file, "r+b") as fh:
        fh.truncate(size // 2)
    line = only_problem(valid_file)
    assert str(valid_file) in line and ("not a readable HDF5 file" in line
                                        or "cannot be read" in line)
    with pytest.raises(ValidationError) as excinfo:
        check_input(valid_file)
    assert excinfo.value.problems == [line]


def test_garbage_and_absent_files(tmp_path):
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"this is not HDF5\n" * 100)
    line = only_problem(junk)
    assert line.startswith(f"{junk}: not a readable HDF5 file (")
    assert "does not exist" in only_problem(tmp_path / "nothing.h5")


# ---------------------------------------------------------------------------- info


def test_info_on_valid_input(valid_file, capsys):
    summary, problems = info_lines(valid_file)
    assert problems == []
    text = "\n".join(summary)
    assert "3-D ptycho-tomography" in text and f"({NZ}, {N}, {N})" in text
    assert "angles: 5, from 0 to 144 deg" in text
    assert f"frames: {sum(FRAMES_PER_ANGLE)} in all, 0 to 5 per angle" in text
    assert "is_fft_shifted = 0" in text and "truth: absent" in text
    assert main_info(valid_file) == 0
    out, err = capsys.readouterr()
    assert "3-D ptycho-tomography" in out and err == ""


def test_info_on_bad_input(valid_file, capsys):
    with h5py.File(valid_file, "r+") as f:
        f[DATA][0, 0, 0] = -5.0
        f[PROBE][...] = 0
    assert main_info(valid_file) == 1
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines)
    assert any("negative" in line for line in lines) and any("all zeros" in line for line in lines)


def test_info_on_output_file(tmp_path, capsys):
    from ptmpi.io.output import write_output

    path = tmp_path / "rec.h5"
    metrics = {"iteration": [1, 2, 3], "r_factor": [0.5, 0.25, 0.125],
               "rel_change": [1.0, 0.1, 0.01], "wall_s": [0.1, 0.2, 0.3]}
    write_output(path, volume=np.zeros((4, 6, 6), np.complex64),
                 probe=np.ones((3, 3), np.complex64), metrics=metrics,
                 parameters={"algorithm": "apt", "r1": 0.5}, n_ranks=2,
                 input_file="data.h5", input_checksum="sha256:abc")
    summary, problems = info_lines(path)
    text = "\n".join(summary)
    assert problems == [], problems
    assert "output file" in text and "(4, 6, 6) complex64" in text
    assert "algorithm=apt" in text and "n_ranks: 2" in text
    assert "3 recorded iterations" in text and "r_factor=0.125" in text
    with h5py.File(path, "r+") as f:
        del f["/entry_1/ptmpi/metrics/r_factor"]
    assert main_info(path) == 1
    assert "metrics/r_factor: required column is missing" in capsys.readouterr().err


def test_info_on_unrelated_hdf5(tmp_path, capsys):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["x"] = 1
    assert main_info(path) == 1
    assert "neither a ptmpi input file" in capsys.readouterr().err
