"""verify: is a checkpoint intact? Its structure (every format), then its BLAKE3 hashes.

`verifier` walks what a path is (file, sharded model, training checkpoint, folder)
and reports each file; `file_checks` checks one file's structure and its manifest
entry; `manifest` reads and writes the BLAKE3 manifests; `range_hash` hashes byte
ranges on all cores; `lfs` recognises Git LFS pointers and computes the Hub's sha256.

    >>> from safeckpt.ops.verify import verify
    >>> verify("model.safetensors").ok
    True
"""

from .lfs import LfsPointer, parse_lfs_pointer, read_lfs_pointer, sha256_file
from .manifest import MANIFEST_SUFFIX, load_manifest, manifest_path
from .verifier import VerifyReport, describe, verify

__all__ = ["verify", "VerifyReport", "describe", "LfsPointer", "parse_lfs_pointer", "read_lfs_pointer", "sha256_file",
           "load_manifest", "manifest_path", "MANIFEST_SUFFIX"]
