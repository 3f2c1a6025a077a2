"""Memory maps read (or written) once, front to back: their pages dropped from this process's
resident set as it goes, so peak RSS counts what the step holds, not the whole file it went through."""

from __future__ import annotations

import mmap


def release_pages(array) -> None:
    """Drop a memory map's pages from this process's resident set. A read-only or shared map's pages
    stay in the kernel's page cache (written pages are written back from there, nothing is lost);
    a later access reads them again. Arrays that are not memory maps are left alone."""
    mapped = getattr(array, "_mmap", None)
    if mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapped.madvise(mmap.MADV_DONTNEED)
