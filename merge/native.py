"""Optional C loops for the two hottest bf16 steps of a merge: rounding float32 values to bf16
in place (after every op of a bf16 merge: 5-13 times per element) and encoding float32 to bf16
bytes. numpy needs 5 passes over a block for each; the C loop needs one, with the same bits
(integer round-to-nearest-even on the float32 bit pattern; no floating point is involved).

Built at first use with the system C compiler (`$CC`, else `cc`) into
~/.cache/domainforge/ (keyed by the source, the compiler and the machine type; no
`-march=native`, so a cache shared between nodes of different CPU generations stays valid),
and loaded with ctypes. Without a compiler, or when the build fails, the merge says so in one
line and runs the numpy loops: slower, the same bytes (tests/test_merge_native.py).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

SOURCE = r"""
#include <stddef.h>
#include <stdint.h>

/* round to nearest even on the 16 dropped bits, in place: numpy's Rounder, one pass */
void round_bf16(uint32_t *x, size_t n) {
    for (size_t i = 0; i < n; i++) {
        uint32_t u = x[i];
        x[i] = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    }
}

/* float32 bits -> bf16 bits, rounding as above: merge/io.py's encode, one pass */
void encode_bf16(const uint32_t *x, uint16_t *out, size_t n) {
    for (size_t i = 0; i < n; i++) {
        uint32_t u = x[i];
        out[i] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    }
}
"""
DISABLE_ENV = "DOMAINFORGE_MERGE_NUMPY_ONLY"  # set to 1: the numpy loops (for comparisons)


def _library_path(compiler: str) -> Path:
    key = hashlib.sha256(f"{SOURCE}\0{compiler}\0{platform.machine()}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "domainforge"
    return cache / f"merge-kernels-{key}.so"


def _build(compiler: str, target: Path) -> None:
    """Compile into a temporary file next to `target`, then rename: workers that build at the
    same time never load a half-written library."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "kernels.c"
        src.write_text(SOURCE)
        out = Path(tmp) / "kernels.so"
        subprocess.run([compiler, "-O3", "-shared", "-fPIC", "-o", str(out), str(src)], check=True,
                       capture_output=True, timeout=120)
        os.replace(out, target)


@functools.lru_cache(maxsize=None)
def kernels() -> Optional[ctypes.CDLL]:
    """The loaded C loops, or None (numpy loops) after one line on stderr saying why."""
    if os.environ.get(DISABLE_ENV) == "1":
        return None
    compiler = os.environ.get("CC") or "cc"
    target = _library_path(compiler)
    try:
        if not target.is_file():
            if shutil.which(compiler) is None:
                raise OSError(f"no C compiler '{compiler}' (install cc, or set CC)")
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as err:
        reason = err.stderr.decode(errors="replace").strip().splitlines()[-1:] if isinstance(
            err, subprocess.CalledProcessError) and err.stderr else [str(err)]
        print(f"merge: bf16 loops run in numpy (slower, same bytes): {(reason or [''])[0][:160]}", file=sys.stderr)
        return None
    lib.round_bf16.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.round_bf16.restype = None
    lib.encode_bf16.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    lib.encode_bf16.restype = None
    return lib
