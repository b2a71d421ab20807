"""HDF5 input and output: reading by rank (own hyperslab), validation, summaries."""

from ptmpi.io.cxi import InputData, input_checksum, read_input, write_input
from ptmpi.io.validate import ValidationError, check_input, validate_input

__all__ = [
    "InputData",
    "ValidationError",
    "check_input",
    "input_checksum",
    "read_input",
    "validate_input",
    "write_input",
]
