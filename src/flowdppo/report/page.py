"""One self-contained HTML page: every plot, grid and video is embedded as a data URI."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from flowdppo.compare import compute
from flowdppo.compare.frontier import KL_UNIT
from flowdppo.compare.report import add_matched_kl, aggregate, format_cell
from flowdppo.compare.results import PHASES, RunResult
from flowdppo.config import ConfigError
from flowdppo.report import figures
from flowdppo.report.runs import Evaluation, ReportRun

_MIME = {".png": "image/png", ".gif": "image/gif", ".mp4": "video/mp4"}

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:18px 0 6px}.verdict{font-size:17px;background:#eef6ee;border:1px solid #9c9;
padding:10px 14px;border-radius:6px;margin:12px 0}.note{color:#555;font-size:13px}
table{border-collapse:collapse;margin:6px 0 10px}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
tr.winner td{background:#fff6d5;font-weight:600}img.plot{max-width:100%}
.evals{border:1px solid #ddd;padding:8px;border-radius:6px}.evals input{width:60%}
.pair{display:flex;gap:16px;flex-wrap:wrap;align-items:flex-start}.pair figure{margin:0}
figcaption{font-size:12px;color:#444;margin-bottom:4px}pre{background:#f7f7f7;padding:8px;
overflow:auto;max-height:420px;font-size:12px}details{margin:4px 0}
"""

SCRIPT = """
document.querySelectorAll('.evals').forEach(function (box) {
  var items = box.querySelectorAll('.eval');
  var slider = box.querySelector('input');
  var label = box.querySelector('.evlabel');
  function show(i) {
    items.forEach(function (e, k) { e.style.display = k === i ? '' : 'none'; });
    label.textContent = items[i].getAttribute('data-label');
  }
  slider.addEventListener('input', function () { show(Number(slider.value)); });
  show(Number(slider.value));
});
"""


def file_uri(path: Path) -> str:
    data = path.read_bytes()
    problem = media_damage(path.suffix, data)
    if problem is not None:
        raise ConfigError(
            f"{path} is {problem}, as a kill while it was written leaves one (flowdppo now "
            "writes grids whole): delete it or move it away, then make the report again"
        )
    return f"data:{_MIME[path.suffix]};base64," + base64.b64encode(data).decode()


def media_damage(suffix: str, data: bytes) -> str | None:
    """Why a grid file of this suffix could not be shown, or None when it looks whole."""
    if not data:
        return "empty (0 bytes)"
    if suffix == ".png":
        if not data.startswith(b"\x89PNG\r\n\x1a\n"):
            return "not a PNG image"
        if not data.endswith(b"IEND\xaeB`\x82"):
            return "a cut PNG image (it ends before its last chunk)"
    if suffix == ".gif" and not data.endswith(b";"):
        return "a cut GIF image (no trailer)"
    return None


COLUMNS = [
    ("train_before", "reward before", "{:.3f}"),
    ("train_after", "reward after", "{:.3f}"),
    ("gain", "gain", "{:+.3f}"),
    ("kl_ref", "KL to ref (1e-3/step)", "{:.3g}"),
    ("gain_at_matched_kl", "gain at matched KL", "{:+.3f}"),
    ("heldout_change", "held-out change", "{:+.3f}"),
    ("grad_blocked", "grad blocked", "{:.3f}"),
    ("wall_s", "wall s", "{:.1f}"),
]


def _matched_kl(groups: dict[str, list[ReportRun]]) -> float:
    """With several groups, each run's gain at the lowest final KL of any run."""
    if len(groups) < 2:
        return math.nan
    return add_matched_kl([r.result for rs in groups.values() for r in rs])


def summary(groups: dict[str, list[ReportRun]]) -> tuple[str, str | None]:
    """The verdict line and the summary table; and the winning group."""
    level = _matched_kl(groups)
    stats = {g: aggregate([r.result for r in rs]) for g, rs in groups.items()}
    finished = {g: s for g, s in stats.items() if "train_after" in s}
    winner = max(finished, key=lambda g: finished[g]["train_after"][0]) if finished else None
    cols = [c for c in COLUMNS if c[0] != "gain_at_matched_kl" or math.isfinite(level)]
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in cols)
    rows = []
    for g, rs in groups.items():
        n_ok = sum(r.result.ok for r in rs)
        state = f"{n_ok}/{len(rs)}" if len(rs) > 1 else ("finished" if n_ok else "")
        problems = [
            f"{r.result.status.error or 'failed'} ({r.logged} iterations logged)"
            for r in rs
            if not r.result.ok
        ]
        cells = "".join(f"<td>{format_cell(stats[g], k, f)}</td>" for k, _, f in cols)
        mark = "★ " if g == winner else ""
        cls = ' class="winner"' if g == winner else ""
        note = f"<br><span class=note>{html.escape('; '.join(problems))}</span>" if problems else ""
        algorithm = html.escape(rs[0].result.status.spec.algorithm)
        rows.append(
            f"<tr{cls}><td>{mark}{html.escape(g)}{note}</td><td>{algorithm}</td>"
            f"<td>{state}</td>{cells}</tr>"
        )
    table = (
        f"<table><tr><th>run</th><th>algorithm</th><th>runs ok</th>{head}</tr>"
        + "".join(rows)
        + "</table>"
    )
    if winner is None:
        verdict = "No run has finished yet (no summary.json): the curves below are not drawn."
    else:
        s = finished[winner]
        lead = "Winner" if len(groups) > 1 else "Run"
        verdict = (
            f"<b>{lead}: {html.escape(winner)}</b> — evaluation reward "
            f"{s['train_after'][0]:.3f} ({s['gain'][0]:+.3f} over the base model) at KL to the "
            f"reference {s['kl_ref'][0]:.3g} × 1e-3 per step; held-out change "
            f"{s['heldout_change'][0]:+.3f}."
        )
        if math.isfinite(level):
            best = max(finished, key=lambda g: finished[g].get("gain_at_matched_kl", (-1e9,))[0])
            verdict += (
                f"<br><span class=note>At matched KL ({level:.3g} × 1e-3, the lowest final KL "
                f"of any run) the largest gain is {html.escape(best)}'s "
                f"({finished[best]['gain_at_matched_kl'][0]:+.3f}).</span>"
            )
    table += (
        "<p class=note>Rewards are of the deterministic ODE samples of the fixed-noise "
        "evaluation on the trained prompts; the winner has the highest reward after "
        "training. KL to the reference is per SDE step, x 1e-3 (docs/method.md). With several "
        "seeds: mean ± std.</p>"
    )
    return f"<div class=verdict>{verdict}</div>" + table, winner


def counts_table(groups: dict[str, list[ReportRun]]) -> str:
    """Forward calls (and samples) per phase and backward calls, one row per group."""
    stats = {g: aggregate([r.result for r in rs]) for g, rs in groups.items()}
    keys = {k for st in stats.values() for k in st}
    phases = [p for p in PHASES if f"count/forward_calls/{p}" in keys]
    if not phases:
        return ""
    head = "".join(f"<th>{p}</th>" for p in phases)
    body = ""
    for g, st in stats.items():
        cells = "".join(
            f"<td>{format_cell(st, f'count/forward_calls/{p}', '{:.0f}')} "
            f"({format_cell(st, f'count/forward_samples/{p}', '{:.0f}')})</td>"
            for p in phases
        )
        backward = format_cell(st, "count/backward_calls", "{:.0f}")
        body += f"<tr><td>{html.escape(g)}</td>{cells}<td>{backward}</td></tr>"
    return (
        "<h3>Forward and backward passes</h3><p class=note>Model forward calls per phase "
        "(samples in brackets) and backward calls over the whole run; equal budgets show "
        "equal counts.</p>"
        f"<table><tr><th>run</th>{head}<th>backward</th></tr>{body}</table>"
    )


def compute_section(ok: dict[str, list[RunResult]], styles) -> str:
    """Reward against training compute, and with several runs the best at the smallest
    run's compute."""
    view = compute.compute_view(ok)
    line = html.escape(compute.best_line(view)) if len(ok) > 1 or view is None else ""
    if view is None:
        return f"<h3>Reward against compute</h3><p class=note>{line}</p>"
    return (
        "<h3>Reward against compute</h3><p class=note>Evaluation reward gain against the "
        "training forward-equivalents spent to reach it (a backward counts as two forwards; "
        "evaluations left out) and against the training wall seconds (flowdppo compare's "
        f"results.md explains both).</p><p>{line}</p>"
        f'<img class=plot alt="reward against compute" src="{figures.compute(ok, styles, view)}">'
    )


def inference_table(label: str, rows: list[dict]) -> str:
    def cell(v, fmt):
        return fmt.format(v) if isinstance(v, (int, float)) and math.isfinite(v) else "-"

    body = "".join(
        f"<tr><td>{html.escape(str(r.get('model', '-')))}</td><td>{cell(r.get('steps'), '{:d}')}</td>"
        f"<td>{cell(r.get('nfe'), '{:d}')}</td><td>{cell(r.get('reward_mean'), '{:.3f}')}</td>"
        f"<td>{cell(r.get('ms_per_image'), '{:.1f}')}</td><td>{html.escape(str(r.get('lora') or '-'))}</td></tr>"
        for r in rows
    )
    return (
        f"<h3>{html.escape(label)}</h3><table><tr><th>model</th><th>steps</th><th>NFE</th>"
        f"<th>reward</th><th>ms / image</th><th>LoRA</th></tr>{body}</table>"
    )


def _evaluation_html(ev: Evaluation) -> str:
    parts = []
    for v in ev.videos:
        if v.suffix == ".mp4":
            parts.append(
                f'<video controls autoplay loop muted playsinline src="{file_uri(v)}"></video>'
            )
        else:
            parts.append(f'<img alt="video grid" src="{file_uri(v)}">')
    if not ev.videos:
        parts += [f'<img alt="sample grid" src="{file_uri(p)}">' for p in ev.pages]
    return "<br>".join(parts)


def _eval_label(run: ReportRun, ev: Evaluation) -> str:
    r = run.result
    row = (
        r.before
        if ev.iteration == 0
        else next((x for x in r.rows if x["iteration"] == ev.iteration), {})
    )
    text = f"iteration {ev.iteration}"
    for key, name in ((figures.EVAL_TRAIN, "reward"), (figures.EVAL_HELD, "held-out")):
        if row.get(key) is not None:
            text += f", {name} {row[key]:.3f}"
    if row.get(figures.EVAL_KL) is not None:
        text += f", KL {row[figures.EVAL_KL] / KL_UNIT:.3g} × 1e-3"
    return text


def samples_section(run: ReportRun) -> str:
    evs = [ev for ev in run.evaluations if ev.pages or ev.videos]
    if not evs:
        return f"<h3>{html.escape(run.label)}</h3><p class=note>No sample grids in this run.</p>"
    first, last = evs[0], evs[-1]
    items = "".join(
        f'<div class=eval data-label="{html.escape(_eval_label(run, ev))}">'
        f"{_evaluation_html(ev)}</div>"
        for ev in evs
    )
    return (
        f"<h3>{html.escape(run.label)}</h3>"
        "<p class=note>Trained prompts, then held-out prompts; one prompt per row, each "
        "sample's reward under it; the same noise at every evaluation.</p>"
        f"<div class=pair><figure><figcaption>{html.escape(_eval_label(run, first))} "
        f"(before training)</figcaption>{_evaluation_html(first)}</figure>"
        f"<figure class=evals><figcaption>evaluation <input type=range min=0 "
        f'max="{len(evs) - 1}" value="{len(evs) - 1}" aria-label="evaluation"> '
        f"<span class=evlabel>{html.escape(_eval_label(run, last))}</span></figcaption>"
        f"{items}</figure></div>"
    )


def render(groups: dict[str, list[ReportRun]], title: str, command: str) -> str:
    table, _ = summary(groups)
    ok = {g: [r.result for r in rs if r.result.ok] for g, rs in groups.items()}
    ok = {g: rs for g, rs in ok.items() if rs}
    styles = figures.styles_of(list(groups))
    body = [f"<h1>{html.escape(title)}</h1><p class=note>{html.escape(command)}</p>", table]
    if ok:
        body += [
            "<h2>Reward</h2>"
            "<p class=note>Top: against iteration (rollouts, and the fixed-noise evaluation on "
            "trained and held-out prompts, dotted). Bottom: against wall time.</p>",
            f'<img class=plot alt="reward" src="{figures.reward(ok, styles)}">',
            "<h2>KL to the reference</h2>",
            f'<img class=plot alt="KL to the reference" src="{figures.kl(ok, styles)}">',
        ]
        if len(ok) > 1:
            body += [
                "<h2>Reward-KL frontier</h2>"
                "<p class=note>Evaluation reward gain over the base model against KL to the "
                "reference, at every evaluation: up and to the left is better.</p>",
                f'<img class=plot alt="frontier" src="{figures.frontier(ok, styles)}">',
            ]
        body += [
            "<h2>Trust region</h2><p class=note>Left: the fraction of step terms whose "
            "gradient the objective removed (comparable across objectives). Right: the "
            "fraction outside the zone (Flow-DPPO's KL mask, ratio clipping's window).</p>",
            f'<img class=plot alt="masked fraction" src="{figures.trust_region(ok, styles)}">',
            "<h2>Ratio statistics</h2>",
            f'<img class=plot alt="ratio statistics" src="{figures.ratio(ok, styles)}">',
            "<h2>Cost</h2>",
            f'<img class=plot alt="time per phase" src="{figures.phase_times(ok)}">',
            counts_table(groups),
            compute_section(ok, styles),
        ]
    inference = {g: rs[0].inference for g, rs in groups.items() if rs[0].inference}
    if inference:
        body.append(
            "<h2>Inference cost</h2><p class=note>From <code>flowdppo eval RUN --steps</code>: "
            "the base and trained models at several sampling step counts, timed on the "
            "machine that ran it.</p>"
        )
        body.append(
            f'<img class=plot alt="reward against NFE" src="{figures.inference(inference, styles)}">'
        )
        body += [inference_table(g, rows) for g, rows in inference.items()]
    body.append("<h2>Samples at each evaluation</h2>")
    body += [samples_section(rs[0]) for rs in groups.values()]
    body.append("<h2>Configuration</h2>")
    for g, rs in groups.items():
        body.append(
            f"<details><summary>{html.escape(g)}: config.yaml ({html.escape(str(rs[0].result.status.spec.run_dir))})"
            f"</summary><pre>{html.escape(rs[0].config_text)}</pre></details>"
        )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        + "\n".join(body)
        + f"<script>{SCRIPT}</script></body></html>\n"
    )
