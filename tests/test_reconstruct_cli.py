"""``ptmpi reconstruct`` end to end on one process: output layout, figures, refusals."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from ptmpi.cli import main


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rec") / "in.h5"
    assert main(["simulate", "-o", str(path), "--n", "20", "--nz", "16", "--angles", "5",
                 "--step", "6", "--probe-size", "10", "--fwhm", "3"]) == 0
    return path


def test_reconstruct_writes_spec4_output_and_figures(data_file, tmp_path, capsys):
    out = tmp_path / "rec.h5"
    assert main(["reconstruct", str(data_file), "-o", str(out), "--iterations", "6"]) == 0
    with h5py.File(out, "r") as f:
        u = f["entry_1/image_1/data"]
        assert u.shape == (16, 20, 20) and u.dtype == np.complex64
        assert f["entry_1/image_2/data"].shape == (10, 10)
        proc = f["entry_1/process_1"]
        params = json.loads(proc["parameters"][()])
        assert params["algorithm"] == "apt" and params["tv_weight"] > 0
        # the r2 rule is stored with its terms (a small volume keeps the paper's 0.1)
        assert params["r2_rule"].startswith("r2 = min(0.1, 20 d / L, 4.8 / n) = 0.1 ")
        assert params["r2"] == 0.1 and params["mean_diagonal_DhD"] > 0
        assert proc["n_ranks"][()] == 1
        assert proc["input_checksum"][()].decode().startswith("sha256:")
        metrics = f["entry_1/ptmpi/metrics"]
        assert list(metrics["iteration"][...]) == [1, 2, 3, 4, 5, 6]
        for key in ("r_factor", "rel_change", "wall_s", "snr_db"):
            assert metrics[key].shape == (6,)
        assert np.all(np.diff(metrics["wall_s"][...]) >= 0)
        assert metrics["r_factor"][-1] < metrics["r_factor"][0]
    assert (tmp_path / "rec-slices.png").stat().st_size > 1000
    assert (tmp_path / "rec-convergence.png").stat().st_size > 1000
    assert main(["info", str(out)]) == 0
    # existing output is refused without --force and left intact
    before = out.read_bytes()
    assert main(["reconstruct", str(data_file), "-o", str(out), "--iterations", "2"]) == 1
    assert "exists" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main(["reconstruct", str(data_file), "-o", str(out), "--iterations", "2",
                 "--algorithm", "apts", "--likelihood", "agm", "--force",
                 "--no-figures"]) == 0
    with h5py.File(out, "r") as f:
        params = json.loads(f["entry_1/process_1/parameters"][()])
        assert params["algorithm"] == "apts" and params["tv_weight"] == 0
        assert params["likelihood"] == "agm"


def test_reconstruct_refuses_bad_requests(data_file, tmp_path, capsys):
    assert main(["reconstruct", str(data_file), "-o", str(tmp_path / "no/such/dir/r.h5"),
                 "--iterations", "1"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["reconstruct", str(tmp_path / "missing.h5"), "-o", str(tmp_path / "r.h5")]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "missing.h5" in err
    assert main(["reconstruct", str(data_file), "-o", str(tmp_path / "r.h5"),
                 "--r2", "-1"]) == 2  # a usage error
    assert "r2" in capsys.readouterr().err
    assert not (tmp_path / "r.h5").exists()


def test_reconstruct_explains_that_a_2d_dataset_needs_ptycho2d(tmp_path, capsys, siemens_path):
    assert main(["reconstruct", str(siemens_path), "-o", str(tmp_path / "r.h5")]) == 1
    assert "2-D ptychography dataset" in capsys.readouterr().err


def test_a_warning_every_rank_logs_alike_is_shown_once(capsys):
    """Records logged with ``extra=REPLICATED`` (conclusions from replicated values) are
    shown by rank 0 only; other warnings by every rank, with the rank named."""
    import logging
    import warnings

    from ptmpi.cli import _setup_logging
    from ptmpi.progress import REPLICATED

    class Rank:
        size = 2

        def __init__(self, rank):
            self.rank, self.is_root = rank, rank == 0

    log = logging.getLogger("ptmpi.test")
    shown = {}
    format_warning = warnings.formatwarning
    with warnings.catch_warnings():  # _setup_logging sets the process's warning filters
        try:
            for rank in (0, 1):
                _setup_logging(Rank(rank), verbose=False)
                log.warning("alike on every rank", extra=REPLICATED)
                log.warning("this rank's own")
                shown[rank] = capsys.readouterr().err.splitlines()
        finally:
            logging.captureWarnings(False)
            warnings.formatwarning = format_warning
            logging.basicConfig(force=True)
    assert shown[0] == ["[rank 0] alike on every rank", "[rank 0] this rank's own"]
    assert shown[1] == ["[rank 1] this rank's own"]
