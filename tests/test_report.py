import json

from kolora.report import ascii_chart, loss_series, read_metrics


def test_loss_series_keeps_the_latest_line_per_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"kind": "eval", "step": 0, "val_loss": 3.0}, {"kind": "train", "step": 1, "loss": 2.9},
             {"kind": "train", "step": 2, "loss": 2.5}, {"kind": "train", "step": 2, "loss": 2.4},
             {"kind": "eval", "step": 2, "val_loss": 2.6}]
    path.write_text("\n".join(map(json.dumps, lines)) + "\n{\"kind\": \"tra", encoding="utf-8")  # cut last line
    series = loss_series(read_metrics(path))
    assert series["train"] == [(1, 2.9), (2, 2.4)]
    assert series["validation"] == [(0, 3.0), (2, 2.6)]


def test_ascii_chart_places_extremes_on_the_axis_labels():
    chart = ascii_chart({"train": [(1, 2.0), (10, 1.0)], "validation": [(0, 3.0), (10, 1.5)]}, width=20, height=5)
    assert chart[0].startswith(" 3.000 ┤o")  # highest value, first column
    assert chart[4].startswith(" 1.000 ┤") and chart[4].endswith("·")  # lowest value, last column
    assert "· train loss" in chart[-1]
    assert ascii_chart({"train": [(1, 2.0)]}) == []  # one point draws nothing
