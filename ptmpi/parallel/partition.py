"""Block partition of angles over ranks (the ``divmod`` rule)."""

from __future__ import annotations


def block_partition(n_items: int, n_parts: int, part: int) -> tuple[int, int]:
    """``[start, stop)`` of block ``part`` when ``n_items`` are split into ``n_parts`` blocks.

    The first ``n_items % n_parts`` blocks get one item more; blocks are contiguous and in
    order, so concatenating them in rank order restores the global order.
    """
    if n_parts < 1:
        raise ValueError(f"number of parts must be >= 1, got {n_parts}")
    if not 0 <= part < n_parts:
        raise ValueError(f"part {part} out of range for {n_parts} parts")
    size, extra = divmod(n_items, n_parts)
    start = part * size + min(part, extra)
    return start, start + size + (1 if part < extra else 0)


def block_sizes(n_items: int, n_parts: int) -> list[int]:
    """Sizes of all blocks of :func:`block_partition`."""
    return [b - a for a, b in (block_partition(n_items, n_parts, p) for p in range(n_parts))]
