"""SLURM's compressed host and tasks-per-node lists (tests/test_slurm.py also checks host lists against scontrol)."""

from __future__ import annotations

import pytest

from moelora_ds.distributed.slurm_nodelist import expand_nodelist, expand_tasks_per_node


@pytest.mark.parametrize("nodelist, hosts", [
    ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
    ("gpu5", ["gpu5"]),
    ("node[1-2]", ["node1", "node2"]),
    ("node[8-10]", ["node8", "node9", "node10"]),
    ("node[008-010]", ["node008", "node009", "node010"]),
    ("rack[1-2]-n[3,5]", ["rack1-n3", "rack1-n5", "rack2-n3", "rack2-n5"]),
    ("a1,b[2],c-x[0-1]", ["a1", "b2", "c-x0", "c-x1"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["node[1-", "node]1[", "node[a-b]", "node[3-1]", "n[[1]]", "", "node[]"])
def test_expand_nodelist_rejects_malformed(nodelist):
    with pytest.raises(ValueError, match="node list"):
        expand_nodelist(nodelist)


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("8") == [8]
    with pytest.raises(ValueError, match="tasks-per-node"):
        expand_tasks_per_node("2(x)")
