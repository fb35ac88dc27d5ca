"""blockdiff: block signatures, content-defined chunking, patching, framing.

A leaf library (stdlib, xxhash, pyzstd, pyfastcdc only) used by discrep to
replicate files by transferring only the changed parts:

* ``signature`` - fixed-block two-level (fine/coarse) signatures, comparison
  and partial-read helpers;
* ``cdc`` - FastCDC content-defined chunk lists and copy/fetch plans for
  shifted data;
* ``patch`` - write fetched ranges / rebuild a file from a plan;
* ``framing`` - one-byte-flag zstd frames;
* ``sparse`` - SEEK_DATA/SEEK_HOLE extent probing.

Threading: all functions are reentrant; values are immutable.  See each
module's docstring for fd-sharing rules.
"""
from __future__ import annotations

from .cdc import (CDC_AVG, CDC_MAX, CDC_MIN, ChunkList, Op, chunk_bytes, chunk_fd, fetch_ranges,
                  plan)
from .errors import (BlockdiffError, ChunkListFormatError, FrameError, PatchError, ShortReadError,
                     SignatureFormatError)
from .framing import pack, unpack
from .patch import apply_ranges, build_from_plan
from .signature import (COARSE_DIGEST, COARSE_FACTOR, FINE_DIGEST, FINE_SIZE, HEADER_SIZE, SigHeader,
                        Signature, blocks_to_ranges, changed_blocks, coarse_digests, differing_coarse,
                        differing_fine, fine_digests, sign_bytes, sign_fd, sign_path, sign_small,
                        zero_block_digest)
from .sparse import data_extents, is_sparse

__all__ = [
    "CDC_AVG", "CDC_MAX", "CDC_MIN", "ChunkList", "Op", "chunk_bytes", "chunk_fd", "fetch_ranges", "plan",
    "BlockdiffError", "ChunkListFormatError", "FrameError", "PatchError", "ShortReadError",
    "SignatureFormatError",
    "pack", "unpack",
    "apply_ranges", "build_from_plan",
    "COARSE_DIGEST", "COARSE_FACTOR", "FINE_DIGEST", "FINE_SIZE", "HEADER_SIZE", "SigHeader", "Signature",
    "blocks_to_ranges", "changed_blocks", "coarse_digests", "differing_coarse", "differing_fine",
    "fine_digests", "sign_bytes", "sign_fd", "sign_path", "sign_small", "zero_block_digest",
    "data_extents", "is_sparse",
]
