"""`eval/report.html`: one self-contained file that opens offline.

Inline CSS and inline SVG only — no JavaScript, no CDN, no web fonts — so the file can be
mailed, archived or opened on an air-gapped machine and still show everything: the loss
curves of training, base-vs-tuned bars per metric (overall, per category, per difficulty),
and every question with its reference, base and tuned answers, worst regressions first.
"""

from __future__ import annotations

import math
from html import escape

BASE_COLOR, TUNED_COLOR = "#9aa0a6", "#1a73e8"
TRAIN_COLOR, VAL_COLOR = "#1a73e8", "#e8710a"
# metric -> (label, higher is better, axis maximum or None for "largest value")
BAR_METRICS = {
    "perplexity": ("answer perplexity (낮을수록 좋음)", False, None),
    "chrf": ("chrF", True, 100.0),
    "rouge_l": ("ROUGE-L", True, 100.0),
    "bleu": ("BLEU", True, 100.0),
    "fact_recall": ("fact recall (사실 재현율)", True, 1.0),
    "eos_rate": ("EOS rate (답변 종료율)", True, 1.0),
    "distinct_2": ("distinct-2", True, 1.0),
    "loop_rate": ("loop rate (반복 비율, 낮을수록 좋음)", False, 1.0),
}

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI','Noto Sans KR','Malgun Gothic',sans-serif;margin:24px auto;
max-width:1200px;padding:0 16px;color:#202124;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #dadce0;padding-bottom:4px}
.meta{color:#5f6368;font-size:.9em}table{border-collapse:collapse;width:100%}
th,td{border:1px solid #dadce0;padding:4px 8px;vertical-align:top;text-align:left;font-size:.9em}
th{background:#f1f3f4}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.better{color:#188038;font-weight:600}.worse{color:#d93025;font-weight:600}.same{color:#5f6368}
.warn{background:#fef7e0;border-left:4px solid #f9ab00;padding:8px 12px;margin:6px 0}
.ok{background:#e6f4ea;border-left:4px solid #188038;padding:8px 12px;margin:6px 0}
.unsupported{background:#fce8e6;color:#a50e0e;padding:2px 6px;margin:3px 0;font-size:12px;border-radius:4px}
.grid{display:flex;flex-wrap:wrap;gap:16px}.chart{flex:0 1 370px}
.ans{max-height:14em;overflow:auto;white-space:pre-wrap}
.badge{display:inline-block;font-size:.75em;padding:0 5px;border-radius:3px;margin:2px 2px 0 0;background:#e8eaed}
.bad{background:#fce8e6;color:#a50e0e}.good{background:#e6f4ea;color:#137333}
.legend span{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;vertical-align:middle}
small{color:#5f6368}
"""


def _ks(recall: dict) -> list[int]:
    """The k values of a recall@k result (retrieval.recall_ks; not imported: this module draws only)."""
    return sorted(int(key[len("recall@"):]) for key in recall if key.startswith("recall@"))


def fmt(name: str, value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if name in ("chrf", "rouge_l", "bleu"):
        return f"{value:.1f}"
    if name == "perplexity":
        return f"{value:.2f}"
    if isinstance(value, int):
        return str(value)
    return f"{value:.2f}"


def signed(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:+.{digits}f}"


def _finite(values) -> list[float]:
    return [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


# --------------------------------------------------------------------------- charts
def line_chart(series: dict[str, list[tuple[float, float]]], width: int = 720, height: int = 260) -> str:
    """Train and validation loss by step, as an inline SVG."""
    points = [p for pts in series.values() for p in pts]
    if len(points) < 2:
        return "<p><small>no loss curve: metrics.jsonl has fewer than two points</small></p>"
    left, right, top, bottom = 56, 16, 16, 36
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.05 or 0.05
    y0, y1 = y0 - pad, y1 + pad
    x1 = x1 if x1 > x0 else x0 + 1

    def px(x):
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def py(y):
        return top + (y1 - y) / (y1 - y0) * (height - top - bottom)

    parts = [f'<svg role="img" aria-label="loss curves" viewBox="0 0 {width} {height}" width="100%" '
             f'xmlns="http://www.w3.org/2000/svg" font-size="11">']
    for i in range(5):  # y grid with labels
        y = y0 + (y1 - y0) * i / 4
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.2f}</text>')
    for i in range(5):  # x ticks
        x = x0 + (x1 - x0) * i / 4
        parts.append(f'<text x="{px(x):.1f}" y="{height - bottom + 16}" text-anchor="middle">{x:.0f}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 4}" text-anchor="middle">step</text>')
    parts.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{height - bottom}" stroke="#999"/>'
                 f'<line x1="{left}" x2="{width - right}" y1="{height - bottom}" y2="{height - bottom}" stroke="#999"/>')
    colors = {"train": TRAIN_COLOR, "validation": VAL_COLOR}
    for name, pts in series.items():
        if not pts:
            continue
        color = colors.get(name, "#333")
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        parts.append(f'<polyline class="series-{escape(name)}" fill="none" stroke="{color}" stroke-width="2" '
                     f'points="{path}"/>')
        if name == "validation":
            parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"><title>step {x:g}: '
                      f'{y:.4f}</title></circle>' for x, y in pts]
    parts.append("</svg>")
    legend = ('<div class="legend"><span style="background:%s"></span>train loss'
              '<span style="background:%s"></span>validation loss</div>' % (TRAIN_COLOR, VAL_COLOR))
    return "".join(parts) + legend


def bar_chart(metric: str, rows: list[tuple[str, float | None, float | None]], labels: tuple[str, str]) -> str:
    """Base and tuned bars for one metric, one pair per row (overall, then each group)."""
    title, _, axis_max = BAR_METRICS[metric]
    values = _finite(v for _, b, t in rows for v in (b, t))
    top = axis_max or (max(values) * 1.1 if values else 1.0)
    top = top if top > 0 else 1.0
    label_w, bar_w, value_w, row_h, bar_h = 110, 220, 48, 30, 11
    width, height = label_w + bar_w + value_w, 22 + row_h * len(rows)
    parts = [f'<svg role="img" aria-label="{escape(title)}" viewBox="0 0 {width} {height}" width="100%" '
             f'xmlns="http://www.w3.org/2000/svg" font-size="11" class="bars bars-{metric}">',
             f'<text x="0" y="13" font-weight="600">{escape(title)}</text>']
    for i, (label, b, t) in enumerate(rows):
        y = 22 + i * row_h
        parts.append(f'<text x="{label_w - 6}" y="{y + bar_h + 4}" text-anchor="end">{escape(label[:14])}</text>')
        for j, (value, color, who) in enumerate(((b, BASE_COLOR, labels[0]), (t, TUNED_COLOR, labels[1]))):
            yy = y + j * (bar_h + 1)
            ok = isinstance(value, (int, float)) and math.isfinite(value)
            w = max(0.0, min(1.0, value / top)) * bar_w if ok else 0.0
            parts.append(f'<rect x="{label_w}" y="{yy}" width="{w:.1f}" height="{bar_h}" fill="{color}">'
                         f'<title>{escape(who)} · {escape(label)}: {fmt(metric, value)}</title></rect>'
                         f'<text x="{label_w + w + 3:.1f}" y="{yy + bar_h - 2}">{fmt(metric, value)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def group_charts(metrics: dict, key: str | None) -> str:
    """One bar chart per metric: overall first, then each category (or difficulty)."""
    base, tuned = metrics["base"], metrics["tuned"]
    labels = (metrics["sides"]["base"]["label"], metrics["sides"]["tuned"]["label"])
    groups = list((tuned.get(key) or {}).keys()) if key else []
    charts = []
    for metric in BAR_METRICS:
        rows = [("전체 overall", base.get(metric), tuned.get(metric))]
        rows += [(g, base[key][g].get(metric), tuned[key][g].get(metric)) for g in groups]
        charts.append(f'<div class="chart">{bar_chart(metric, rows, labels)}</div>')
    legend = (f'<div class="legend"><span style="background:{BASE_COLOR}"></span>base: {escape(labels[0])}'
              f'<span style="background:{TUNED_COLOR}"></span>tuned: {escape(labels[1])}</div>')
    return legend + '<div class="grid">' + "".join(charts) + "</div>"


# --------------------------------------------------------------------------- tables
def summary_table(metrics: dict) -> str:
    rows = []
    for v in metrics["verdict"]:
        change = (f"{100 * v['change']:+.0f}%" if v["metric"] == "perplexity" else
                  f"{v['change']:+.1f}" if v["metric"] in ("chrf", "rouge_l", "bleu") else f"{v['change']:+.2f}")
        rows.append(f"<tr><td>{escape(v['label'])}</td><td class=num>{fmt(v['metric'], v['base'])}</td>"
                    f"<td class=num>{fmt(v['metric'], v['tuned'])}</td><td class=num>{change}</td>"
                    f"<td class=\"{v['result']}\">{v['result']}</td></tr>")
    for name, label in (("length_ratio", "length / reference"), ("mean_length", "mean length (chars)"),
                        ("mean_new_tokens", "mean new tokens")):
        rows.append(f"<tr><td>{label}</td><td class=num>{fmt(name, metrics['base'].get(name))}</td>"
                    f"<td class=num>{fmt(name, metrics['tuned'].get(name))}</td><td></td><td></td></tr>")
    ref_len = metrics["tuned"].get("reference_length")
    return ("<table class=summary><tr><th>metric</th><th>base</th><th>tuned</th><th>change</th><th></th></tr>"
            + "".join(rows) + "</table>"
            + (f"<p><small>reference answers: {fmt('mean_length', ref_len)} characters on average; "
               f"{metrics['tuned'].get('facts', 0)} checkable facts.</small></p>" if ref_len else ""))


FOUR_WAY = (("base_plain", "base, no context 검색 없이"), ("base", "base + retrieval 검색"),
            ("tuned_plain", "tuned, no retrieval 검색 없이"), ("tuned", "tuned + retrieval 검색"))
FOUR_WAY_METRICS = ("fact_recall", "chrf", "perplexity", "citation_valid", "facts_supported", "eos_rate")


def grounding_section(metrics: dict) -> str:
    """Retrieval recall and, with `kolora eval --four-way`, the four answers side by side."""
    r = metrics.get("retrieval")
    if not r:
        return ""
    out = [f"<p>top {r['k']} of {r['passages']} passages, {r['context_tokens']} context tokens; the cited article "
           "was retrieved for " + ", ".join(f"@{k}: {fmt('fact_recall', r.get(f'recall@{k}'))}" for k in _ks(r))
           + f" of {r.get('questions', 0)} questions citing one.</p>"]
    if "base_plain" in metrics:
        head = "".join(f"<th>{escape(name)}</th>" for name in FOUR_WAY_METRICS)
        rows = "".join(f"<tr><td>{escape(label)}</td>" + "".join(
            f"<td class=num>{fmt(m, metrics[key].get(m))}</td>" for m in FOUR_WAY_METRICS) + "</tr>"
            for key, label in FOUR_WAY)
        out.append(f"<table class=summary><tr><th>answer</th>{head}</tr>{rows}</table>")
    return "".join(out)


def _badges(side: dict) -> str:
    out = []
    if not side.get("eos"):
        out.append('<span class="badge bad">no EOS</span>')
    if side.get("loop"):
        out.append(f'<span class="badge bad" title="{escape(side["loop"])}">loop</span>')
    out.append(f'<span class="badge">chrF {fmt("chrf", side.get("chrf"))}</span>')
    if side.get("perplexity") is not None:
        out.append(f'<span class="badge">ppl {fmt("perplexity", side["perplexity"])}</span>')
    stated = set(side.get("facts_stated") or [])
    for f in side.get("facts_reference") or []:
        cls = "good" if f in stated else "bad"
        out.append(f'<span class="badge {cls}">{"✓" if f in stated else "✗"} {escape(f)}</span>')
    for claim in (side.get("citation") or {}).get("unsupported") or []:  # grounded runs: the citation check
        out.append(f'<div class="unsupported">⚠ {escape(claim)}</div>')
    return "".join(out)


def _sources(sample: dict) -> str:
    """The passages a grounded run retrieved for the question."""
    if not sample.get("sources"):
        return ""
    return "<br><small>근거 후보: " + ", ".join(escape(x["header"]) for x in sample["sources"]) + "</small>"


def samples_table(samples: list[dict]) -> str:
    rows = []
    for s in samples:
        d = s.get("delta", {})
        where = " / ".join(escape(x) for x in (s.get("category"), s.get("difficulty")) if x)
        rows.append(
            f"<tr class=sample><td class=num>{s['id'] + 1}<br><small>{where}</small></td>"
            f"<td>{escape(s['question'])}{_sources(s)}</td><td><div class=ans>{escape(s['reference'])}</div></td>"
            f"<td><div class=ans>{escape(s['base']['answer'])}</div>{_badges(s['base'])}</td>"
            f"<td><div class=ans>{escape(s['tuned']['answer'])}</div>{_badges(s['tuned'])}</td>"
            f"<td class=num>{signed(d.get('chrf'), 1)}<br><small>facts {signed(d.get('fact_recall'))}"
            f"</small></td></tr>")
    return ("<table class=samples><tr><th>#</th><th>question 질문</th><th>reference 참고 답변</th>"
            "<th>base 기본 모델</th><th>tuned 튜닝 모델</th><th>Δ chrF</th></tr>" + "".join(rows) + "</table>")


def render_report(metrics: dict, samples: list[dict], loss: dict[str, list[tuple[float, float]]]) -> str:
    """The whole page. `samples` in display order (worst regressions first)."""
    sides = metrics["sides"]
    gen = metrics.get("generation", {})
    timing = metrics.get("timing", {})
    warnings = metrics.get("warnings") or []
    health = ("".join(f'<div class="warn">⚠ {escape(w)}</div>' for w in warnings) if warnings
              else '<div class="ok">모든 답변이 EOS로 끝났고 반복 루프가 없습니다 (all answers stopped, no loops).</div>')
    sections = [
        "<h1>kolora eval</h1>",
        f'<p class="meta">{escape(str(metrics.get("target", "")))} · {metrics["data"]["n"]} questions from '
        f'{escape(str(metrics["data"]["source"]))} · {escape(str(metrics.get("created", "")))}<br>'
        f'base = {escape(sides["base"]["label"])} · tuned = {escape(sides["tuned"]["label"])}<br>'
        f'generation: {"greedy" if not gen.get("temperature") else "sampling, T=%s, seed %s" % (gen.get("temperature"), gen.get("seed"))}'
        f', max_new_tokens {gen.get("max_new_tokens")}, repetition_penalty {gen.get("repetition_penalty")}'
        + (f' · {timing["total_s"]:.0f} s' if isinstance(timing.get("total_s"), (int, float)) else "") + "</p>",
        '<h2 id="summary">요약 Summary</h2>', summary_table(metrics),
        *(['<h2 id="grounding">검색과 근거 Retrieval and citations</h2>', grounding_section(metrics)]
          if metrics.get("retrieval") else []),
        '<h2 id="health">답변 상태 Health</h2>', health,
        '<h2 id="loss">학습 곡선 Loss curves</h2>', line_chart(loss),
        '<h2 id="metrics">지표 Metrics (base vs tuned)</h2>', group_charts(metrics, None),
    ]
    if metrics["tuned"].get("by_category"):
        sections += ['<h2 id="by-category">범주별 By category</h2>', group_charts(metrics, "by_category")]
    if metrics["tuned"].get("by_difficulty"):
        sections += ['<h2 id="by-difficulty">난이도별 By difficulty</h2>', group_charts(metrics, "by_difficulty")]
    sections += ['<h2 id="samples">문항별 답변 Answers (worst regressions first)</h2>',
                 "<p><small>Ordered by the change in fact recall, then in chrF, tuned minus base: the questions "
                 "where fine-tuning hurt most come first. ✓/✗: reference facts the answer states or misses; "
                 "⚠: a cited article the corpus lacks, or a number no cited article (nor the question) states."
                 "</small></p>",
                 samples_table(samples)]
    notes = "".join(f"<li><b>{escape(k)}</b>: {escape(v)}</li>" for k, v in (metrics.get("metric_notes") or {}).items())
    sections += ['<h2 id="definitions">정의 Definitions</h2>', f"<ul>{notes}</ul>"]
    return ("<!DOCTYPE html>\n<html lang=\"ko\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>kolora eval — {escape(sides['tuned']['label'])}</title><style>{CSS}</style></head><body>"
            + "\n".join(sections) + "</body></html>\n")
