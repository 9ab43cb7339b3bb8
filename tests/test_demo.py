"""`alexpipe demo`'s own rules (its figures are measured by the real command, README)."""

from __future__ import annotations

import pytest

from alexpipe.demo import DemoConfig, run_demo
from shards.errors import UserError


def test_a_workdir_of_another_seed_is_refused_before_anything_runs(tmp_path):
    marker = tmp_path / "ilsvrc" / ".alexpipe-sample-complete"
    marker.parent.mkdir(parents=True)
    marker.write_text("seed 0\n", encoding="utf-8")
    said = []
    with pytest.raises(UserError, match="holds the demo of seed 0, not seed 1"):
        run_demo(DemoConfig(workdir=tmp_path, seed=1), say=said.append)
    assert said == []
    # An earlier version's empty marker is seed 0's.
    marker.write_text("", encoding="utf-8")
    with pytest.raises(UserError, match="holds the demo of seed 0, not seed 2"):
        run_demo(DemoConfig(workdir=tmp_path, seed=2), say=said.append)
