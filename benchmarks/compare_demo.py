"""Compare two demo results.json files number by number (wall times, seconds and folders left out).

    python benchmarks/compare_demo.py benchmarks/demo_baseline/results.json runs/demo/results.json

The demo is deterministic: after a refactor every number must be the same, digit for digit. Exit code 1
and a list of differences when they are not; stages present in only one file are named.
"""

from __future__ import annotations

import json
import sys
from typing import Any

SKIPPED = ("seconds", "wall", "time", "model", "model_dir")  # keys that measure the machine or name a folder


def leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not any(word in key for word in SKIPPED):
                out.update(leaves(item, f"{prefix}{key}."))
        return out
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in leaves(item, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): value}


def main(before_path: str, after_path: str) -> int:
    before, after = (json.loads(open(path).read()) for path in (before_path, after_path))
    stages = [stage for stage in before if stage in after]
    for stage in sorted(set(before) ^ set(after)):
        print(f"stage {stage!r} only in {'the first' if stage in before else 'the second'} file")
    differences = 0
    for stage in stages:
        old, new = leaves(before[stage]), leaves(after[stage])
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                differences += 1
                print(f"{stage}.{key}: {old.get(key)!r} -> {new.get(key)!r}")
        print(f"{stage}: {len(old)} numbers compared")
    print("identical" if not differences else f"{differences} differences")
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
