"""ptmpi: joint ptychography-tomography reconstruction (APT / APTs), distributed over MPI."""

__version__ = "0.1.0"
