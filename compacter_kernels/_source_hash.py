"""sha256 of the CUDA sources, stdlib only.

setup.py loads this file by path (it must not import the package, which imports torch) and
bakes the digest into the extension; `_extension.status()` recomputes it on an in-place or
editable checkout to detect a `.so` built from older sources.
"""
import hashlib
from pathlib import Path

SOURCE_SUFFIXES = (".cu", ".cuh", ".cpp", ".h", ".hpp")


def source_hash(csrc_dir) -> str:
    """Digest of every source file under `csrc_dir` (relative path + bytes, in sorted order)."""
    root = Path(csrc_dir)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(b"\0")
        # Normalise line endings so a CRLF checkout hashes like the LF one it was built from.
        h.update(f.read_bytes().replace(b"\r\n", b"\n"))
        h.update(b"\0")
    return h.hexdigest()
