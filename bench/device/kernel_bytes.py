"""Bytes moved and bandwidth of each Triton kernel of a compiled step, from inductor's code and a profile.

    TORCHINDUCTOR_CACHE_DIR=/tmp/ic PYTHONPATH=. python3 bench/device/profile_train.py --batch 512 \\
        --channels-last --out prof.json
    mkdir code && find /tmp/ic -name '*.py' -size +20k -exec cp {} code/ \\;   # the graphs' output code
    python3 bench/device/kernel_bytes.py --code code --profile prof.json [--top 40]

For every launch of a Triton kernel in the graphs' `call` functions, the bytes are each pointer
argument's buffer size (from the buffer's allocation, a reinterpret_tensor's shape or an input's
assert_size_stride) times the dtype in the kernel's signature, capped at the launch's element count
(so a broadcast weight counts once), in-out buffers twice. That is an estimate: a kernel may read a
buffer in part or more than once, and L2 may serve part of it. Kernel names come from the profile
(profile_train.py's `kernels_ms`), which sums launches by name across the forward and backward graphs;
a multi-kernel's launches (triton.multi_kernel) are not counted.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
from pathlib import Path

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8, "i1": 1, "i8": 1, "u8": 1, "i32": 4, "i64": 8}


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.replace(" ", "").split(",") if v]


def split_arguments(text: str) -> list[str]:
    """The top-level comma-separated arguments of a call, nested parentheses kept whole."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return [a for a in parts if a]


def launches(source: str) -> list[tuple[str, int]]:
    """(kernel name, bytes) for every Triton launch in one output-code module (none without a `call`)."""
    signatures = {}
    for m in re.finditer(r"(triton_\w+) = async_compile\.triton\('\w+', '''(.*?)'''", source, re.S):
        sig = re.search(r"'signature': \{(.*?)\}", m.group(2))
        signatures[m.group(1)] = re.findall(r"'(\w+)': '([^']+)'", sig.group(1)) if sig else []
    start = re.search(r"def call\((self, )?args\)", source)
    if start is None:
        return []
    call = source[start.start():]
    shapes = {m.group(1): _ints(m.group(2)) for m in re.finditer(r"assert_size_stride\((\w+), \(([^)]*)\)", call)}
    shapes.update({m.group(1): _ints(m.group(2)) for m in re.finditer(r"(\w+) = empty_strided_cuda\(\(([^)]*)\)", call)})
    for m in re.finditer(r"(\w+) = (\w+); del \w+  # reuse", call):
        if m.group(2) in shapes:
            shapes[m.group(1)] = shapes[m.group(2)]
    out = []
    for m in re.finditer(r"(triton_\w+)\.run\((.*)\)", call):
        args = [a for a in split_arguments(m.group(2)) if not a.startswith("stream=")]
        numels = [int(a) for a in args if re.fullmatch(r"\d+", a)]
        elements = math.prod(numels) if numels else None
        total = 0
        for (name, kind), arg in zip(signatures.get(m.group(1), []), args):
            if not kind.startswith("*"):
                continue
            view = re.match(r"reinterpret_tensor\((\w+), \(([^)]*)\)", arg)
            shape = _ints(view.group(2)) if view else shapes.get(arg)
            n = math.prod(shape) if shape else 0
            n = min(n, elements) if elements else n
            total += n * DTYPE_BYTES.get(kind[1:], 4) * (2 if name.startswith("in_out") else 1)
        out.append((m.group(1), total))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--code", required=True, type=Path, help="folder of inductor output-code modules (.py)")
    p.add_argument("--profile", required=True, type=Path, help="profile_train.py's --out JSON")
    p.add_argument("--top", type=int, default=40)
    args = p.parse_args()
    prof = json.loads(args.profile.read_text())
    ms = dict((name, t) for name, t in prof["kernels_ms"])
    moved: dict[str, int] = collections.Counter()
    for f in sorted(args.code.glob("*.py")):
        for name, nbytes in launches(f.read_text()):
            moved[name] += nbytes
    rows = sorted(((ms.get(n, 0.0), n, b) for n, b in moved.items()), reverse=True)
    if not rows or not any(r[0] for r in rows):
        raise SystemExit(f"kernel_bytes: no Triton launch in {args.code} matches a kernel of {args.profile}")
    print(f"{'ms/step':>8} {'MB/step':>9} {'TB/s':>5}  kernel")
    for t, name, b in rows[:args.top]:
        print(f"{t:8.3f} {b / 1e6:9.1f} {b / t / 1e9 if t else 0:5.2f}  {name[:110]}")
    t_all, b_all = sum(r[0] for r in rows), sum(r[2] for r in rows)
    print(f"all {len(rows)} Triton kernels: {t_all:.2f} ms, {b_all / 1e9:.2f} GB per step, {b_all / t_all / 1e9:.2f} TB/s")


if __name__ == "__main__":
    main()
