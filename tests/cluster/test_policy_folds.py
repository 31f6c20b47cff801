"""The folds bench reads eval generate results, names auto by its variant and averages over folds."""
from __future__ import annotations

import json

import pytest

from cluster.bench import policy_folds


def result(path, exclude_own: bool, **scores):
    path.write_text(json.dumps({"settings": {"exclude_own": exclude_own},
                                "systems": {n: {"overall": {"score": s}} for n, s in scores.items()}}))
    return str(path)


def test_means_per_setting_over_folds_and_auto_variants_apart(tmp_path, capsys):
    specs = [f"0:4:{result(tmp_path / 'a.json', False, base=1.0, selection=40.0, mixture=30.0, auto=44.0)}",
             f"1:4:{result(tmp_path / 'b.json', False, selection=30.0, mixture=36.0, auto=20.0)}",
             f"0:15:{result(tmp_path / 'c.json', False, auto=38.0)}",
             f"0:4:{result(tmp_path / 'd.json', True, selection=10.0, auto=12.0)}"]
    summary = policy_folds.table(policy_folds.read_results(specs))
    rows = summary["rows"]
    assert set(rows) == {"selection", "mixture", "auto (4)", "auto (15)"}  # the base model is no mode
    assert rows["auto (4)"]["mean in"] == 32.0 and rows["selection"]["mean in"] == 35.0
    assert rows["auto (15)"]["mean in"] is None  # fold 1 not measured: no mean that hides it
    assert rows["selection"]["mean out"] is None and rows["auto (4)"]["out0"] == 12.0
    assert summary["best_fixed"] == {"in0": 40.0, "in1": 36.0, "out0": 10.0}
    assert policy_folds.main([*specs, "--out", str(tmp_path / "out")]) == 0
    assert "| auto (4) | 44.0 | 20.0 |" in capsys.readouterr().out
    assert (tmp_path / "out" / "policy_folds.png").stat().st_size > 0


def test_a_malformed_spec_is_refused_with_its_form(tmp_path):
    with pytest.raises(SystemExit) as err:
        policy_folds.main([str(tmp_path / "a.json"), "--out", str(tmp_path)])
    assert err.value.code == 2
