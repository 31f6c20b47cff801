"""`demo report`: the markdown table and the plot of eval generate results."""
import json

from cluster.cli import main


def _result(scores: dict[str, float]) -> dict:
    return {"systems": {
        name: {"overall": {"score": value}, "domains": {"dates": {"score": value + 1}, "arithmetic": {"score": value - 1}}}
        for name, value in scores.items()
    }}


def test_report_table_and_plot(tmp_path, capsys):
    (tmp_path / "in.json").write_text(json.dumps(_result({"base": 10.0, "mixture": 50.0})))
    (tmp_path / "ood.json").write_text(json.dumps({**_result({"mixture": 30.0}), "settings": {"exclude_own": True}}))
    png = tmp_path / "plot.png"
    assert main(["demo", "report", "--in-domain", str(tmp_path / "in.json"),
                 "--out-of-domain", str(tmp_path / "ood.json"), "--plot", str(png)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "| setting | system | arithmetic | dates | overall |",
        "|---|---|---|---|---|",
        "| in-domain | base model | 9.0 | 11.0 | **10.0** |",
        "| in-domain | mixture | 49.0 | 51.0 | **50.0** |",
        "| out-of-domain | mixture | 29.0 | 31.0 | **30.0** |",
    ]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_rejects_a_file_that_is_no_result(tmp_path, capsys):
    (tmp_path / "x.json").write_text("[]")
    assert main(["demo", "report", "--in-domain", str(tmp_path / "x.json")]) == 2
    assert "not an `eval generate --json` result" in capsys.readouterr().err


def test_show_lists_the_finished_adapters(tiny_zoo, capsys):
    assert main(["demo", "show", "--root", str(tiny_zoo.root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "| adapter | domain | metric | base model | adapter | training (s) |"
    assert [line.split(" | ")[0] for line in out[2:5]] == ["| uppercase", "| add", "| review_sentiment"]
    assert out[-1] == "3 of 3 adapters finished and verified; 12 held-out queries"


def test_show_without_a_zoo_says_how_to_build_one(tmp_path, capsys):
    assert main(["demo", "show", "--root", str(tmp_path)]) == 2
    assert "loraretriever demo build" in capsys.readouterr().err
