"""Progress reporting on rank 0: a one-line bar on a terminal, log lines otherwise."""

from __future__ import annotations

import logging
import math
import sys

logger = logging.getLogger(__name__)

#: ``extra=`` of a log record that every rank emits alike (a conclusion drawn from reduced,
#: replicated values): shown by rank 0 only, not once per rank.
REPLICATED = {"replicated": True}


def is_replicated(record: logging.LogRecord) -> bool:
    """Whether ``record`` was logged with :data:`REPLICATED`."""
    return bool(getattr(record, "replicated", False))


class Progress:
    """Called once per iteration with the metrics row; prints only where ``enabled``."""

    def __init__(self, total: int, enabled: bool, every: int = 10, stream=None):
        self.total = max(1, total)
        self.enabled = enabled
        self.every = max(1, every)
        self.stream = stream or sys.stderr
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()

    @staticmethod
    def _describe(row: dict) -> str:
        parts = [f"R {row['r_factor']:.4g}", f"change {row['rel_change']:.2e}"]
        if "snr_db" in row and math.isfinite(row["snr_db"]):
            parts.append(f"SNR {row['snr_db']:.2f} dB")
        parts.append(f"{row['wall_s']:.1f} s")
        return ", ".join(parts)

    def __call__(self, row: dict) -> None:
        if not self.enabled:
            return
        k = row["iteration"]
        if self.tty:
            width = 30
            done = int(width * min(k, self.total) / self.total)
            bar = "#" * done + "-" * (width - done)
            self.stream.write(f"\r[{bar}] {k}/{self.total} {self._describe(row)}  ")
            self.stream.flush()
        elif k == 1 or k % self.every == 0 or k == self.total:
            logger.info("iteration %d/%d: %s", k, self.total, self._describe(row))

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
