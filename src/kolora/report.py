"""Pictures people look at instead of reading numbers: a terminal loss chart from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash: the rest is still worth drawing
    return events


def loss_series(events: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """Train and validation loss by step; a resumed run's later lines replace earlier ones."""
    train, val = {}, {}
    for e in events:
        if e.get("kind") == "train" and e.get("loss") is not None:
            train[e["step"]] = e["loss"]
        elif e.get("kind") == "eval" and e.get("val_loss") is not None:
            val[e["step"]] = e["val_loss"]
    return {"train": sorted(train.items()), "validation": sorted(val.items())}


def ascii_chart(series: dict[str, list[tuple[float, float]]], width: int = 60, height: int = 10) -> list[str]:
    """A small line chart: '·' train, 'o' validation, y axis labelled with the loss."""
    marks = {"train": "·", "validation": "o"}
    points = [(x, y) for s in series.values() for x, y in s]
    if len(points) < 2:
        return []
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if y1 - y0 < 1e-9:
        y1 = y0 + 1e-9
    grid = [[" "] * width for _ in range(height)]
    for name, pts in series.items():
        for x, y in pts:
            col = round((x - x0) / max(x1 - x0, 1e-9) * (width - 1))
            row = round((y1 - y) / (y1 - y0) * (height - 1))
            if grid[row][col] != "o":  # validation points stay visible over train points
                grid[row][col] = marks.get(name, "*")
    lines = []
    for i, row in enumerate(grid):
        label = f"{y1 - i * (y1 - y0) / (height - 1):6.3f}" if i in (0, height // 2, height - 1) else " " * 6
        lines.append(f"{label} ┤{''.join(row)}")
    lines.append(" " * 7 + "└" + "─" * width)
    lines.append(" " * 8 + f"step {x0:g}".ljust(width - 10) + f"step {x1:g}")
    lines.append(" " * 8 + "· train loss   o validation loss")
    return lines
