"""`loraretriever config`: the documented defaults load back; bad files get one sentence and exit 2."""
from __future__ import annotations

import yaml

from cluster.cli import main
from services.config import AppConfig


def test_defaults_round_trip(tmp_path, capsys):
    assert main(["config", "defaults"]) == 0
    text = capsys.readouterr().out
    assert "# Redis URL" in text  # descriptions are there as comments
    assert AppConfig.model_validate(yaml.safe_load(text)) == AppConfig()
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert main(["config", "check", str(path)]) == 0


def test_bad_configs_exit_2_with_a_sentence(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("composition: {max_batch_size: 0}\n")
    assert main(["config", "check", str(bad)]) == 2
    assert "max_batch_size" in capsys.readouterr().err
    assert main(["config", "check", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad.write_text("composition: {device_slots: 2, max_adapters_per_request: 3}\n")
    assert main(["config", "check", str(bad)]) == 2
    assert "one request's adapters must fit on the device" in capsys.readouterr().err
