"""SLURM's compressed lists: host names (`node[01-03,07],gpu5`) and tasks per node (`2(x3),1`)."""

from __future__ import annotations

import re
from itertools import product


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list in order, as `scontrol show hostnames` gives it.

    `node[01-03,07],gpu5` -> node01 node02 node03 node07 gpu5; zero padding follows the range's lower
    bound; several bracket groups in one name expand as a product (`r[1-2]n[1-2]` -> r1n1 r1n2 r2n1 r2n2).
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist):
        pieces = re.split(r"\[([^\]]*)\]", item)  # literal, group, literal, group, ..., literal
        parts = [[piece] if i % 2 == 0 else _expand_range_group(piece, nodelist) for i, piece in enumerate(pieces)]
        hosts.extend("".join(combo) for combo in product(*parts))
    if not hosts:
        raise ValueError(f"empty SLURM node list {nodelist!r}")
    return hosts


def _split_top_level(nodelist: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, char in enumerate(nodelist):
        if char == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"malformed SLURM node list {nodelist!r}: nested brackets")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"malformed SLURM node list {nodelist!r}: unbalanced brackets")
        elif char == "," and depth == 0:
            items.append(nodelist[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"malformed SLURM node list {nodelist!r}: unbalanced brackets")
    items.append(nodelist[start:])
    return [item.strip() for item in items if item.strip()]


def _expand_range_group(group: str, nodelist: str) -> list[str]:
    values = []
    for part in group.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not match:
            raise ValueError(f"malformed SLURM node list {nodelist!r}: bad range {part!r}")
        low, high = match.group(1), match.group(2) or match.group(1)
        if int(high) < int(low):
            raise ValueError(f"malformed SLURM node list {nodelist!r}: decreasing range {part!r}")
        values.extend(str(n).zfill(len(low)) for n in range(int(low), int(high) + 1))
    return values


def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM's tasks-per-node string (`2(x3),1` -> [2, 2, 2, 1])."""
    counts = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise ValueError(f"malformed SLURM tasks-per-node list {spec!r}")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts
