"""Summarise a py-spy ``--format raw`` (collapsed stacks) file: top self and total costs."""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_LINE = re.compile(r"^(.*) (\d+)$")


def _frame(text: str) -> str:
    # "func (module/path.py:123)" -> "func (path.py)"; keep the line-free identity
    m = re.match(r"^(.*?) \((.*?)(?::\d+)?\)$", text.strip())
    if not m:
        return text.strip()
    func, where = m.groups()
    parts = where.split("/")
    return f"{func} ({'/'.join(parts[-2:])})"


def summarize(path: Path, top: int = 15) -> dict[str, Any]:
    self_c: Counter[str] = Counter()
    total_c: Counter[str] = Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        frames = [_frame(f) for f in m.group(1).split(";") if f.strip()]
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        n = int(m.group(2))
        samples += n
        if frames:
            self_c[frames[-1]] += n
        for f in set(frames):
            total_c[f] += n

    def pct(c: Counter[str]) -> list[tuple[str, float]]:
        return [(k, round(100 * v / samples, 1)) for k, v in c.most_common(top)] if samples else []

    return {
        "file": str(path),
        "samples": samples,
        "self_pct": pct(self_c),
        "total_pct": pct(total_c),
    }


if __name__ == "__main__":
    res = summarize(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 25)
    print(f"{res['samples']} samples")
    for title in ("self_pct", "total_pct"):
        print(f"\n{title}:")
        for name, p in res[title]:
            print(f"  {p:5.1f}%  {name}")
