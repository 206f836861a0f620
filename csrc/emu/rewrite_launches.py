"""Turn a .cu file into host C++ for the CUDA emulation (csrc/emu/cuda_emu.h).

Every launch ``kernel<T><<<grid, block, smem, stream>>>(args)`` becomes
``::deq_emu::launch(kernel<T>, "kernel<T>", __FILE__, __LINE__, grid, block, smem, stream)(args)``.
The line breaks inside a launch are kept (moved after the rewritten call), and the
output starts with ``#include "cuda_emu.h"`` and a ``#line 1`` directive naming the
original file, so compiler messages and the emulator's errors point at the real
.cu lines. Nothing else of the source changes.

    python csrc/emu/rewrite_launches.py SRC.cu OUT.cpp [--display-name NAME]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

_OPEN, _CLOSE = "<<<", ">>>"


class RewriteError(ValueError):
    """A launch whose kernel expression or configuration could not be parsed."""


def _code_mask(src: str) -> list[bool]:
    """True for characters outside comments and string/char literals."""
    mask = [True] * len(src)
    i, n = 0, len(src)
    while i < n:
        two = src[i:i + 2]
        if two == "//":
            j = src.find("\n", i)
            j = n if j < 0 else j
        elif two == "/*":
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
        elif src[i] in "\"'":
            quote, j = src[i], i + 1
            while j < n and src[j] != quote:
                j += 2 if src[j] == "\\" else 1
            j = min(j + 1, n)
        else:
            i += 1
            continue
        for k in range(i, j):
            mask[k] = False
        i = j
    return mask


def _kernel_start(src: str, end: int) -> int:
    """Start of the kernel expression that ends just before ``end`` (``name<...>`` or ``name``)."""
    i = end
    while i > 0 and src[i - 1].isspace():
        i -= 1
    if i > 0 and src[i - 1] == ">":  # template arguments: walk back over balanced <...> and (...)
        depth = 0
        while i > 0:
            c = src[i - 1]
            if c in ">)":
                depth += 1
            elif c in "<(":
                depth -= 1
            i -= 1
            if depth == 0:
                break
        if depth != 0:
            raise RewriteError(f"unbalanced template arguments before offset {end}")
    ident = re.compile(r"[A-Za-z_0-9:]")
    j = i
    while j > 0 and ident.match(src[j - 1]):
        j -= 1
    if j == i:
        raise RewriteError(f"no kernel name before '<<<' at offset {end}")
    return j


def rewrite(src: str) -> str:
    """The source with every ``<<<...>>>`` launch rewritten (see the module docstring)."""
    mask = _code_mask(src)
    out, pos = [], 0
    search = 0
    while True:
        k = src.find(_OPEN, search)
        if k < 0:
            break
        if not mask[k]:
            search = k + 3
            continue
        close = src.find(_CLOSE, k + 3)
        if close < 0:
            raise RewriteError(f"'<<<' at offset {k} has no matching '>>>'")
        start = _kernel_start(src, k)
        if start < pos:
            raise RewriteError(f"overlapping launches at offset {k}")
        kernel = src[start:k].strip()
        config = src[k + 3:close]
        name = " ".join(kernel.split()).replace("\\", "\\\\").replace('"', '\\"')
        newlines = src[start:close + 3].count("\n")
        call = (f'::deq_emu::launch({" ".join(kernel.split())}, "{name}", __FILE__, __LINE__, '
                f'{" ".join(config.split())})')
        out.append(src[pos:start])
        out.append(call + "\n" * newlines)
        pos = search = close + 3
    out.append(src[pos:])
    return "".join(out)


def emulated_source(src_path: Path, display_name: str | None = None) -> str:
    """The host C++ text of ``src_path`` for the emulation, line numbers kept."""
    text = src_path.read_text()
    name = (display_name or str(src_path)).replace("\\", "/")
    return f'#include "cuda_emu.h"\n#line 1 "{name}"\n' + rewrite(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--display-name", help="file name used in #line (default: SRC as given)")
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(emulated_source(args.src, args.display_name))


if __name__ == "__main__":
    main()
