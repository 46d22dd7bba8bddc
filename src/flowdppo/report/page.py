"""One self-contained HTML page: every plot, grid and video is embedded as a data URI."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from flowdppo.compare import compute
from flowdppo.compare.report import add_matched_kl, aggregate, format_cell
from flowdppo.compare.results import PHASES, RunResult
from flowdppo.config import ConfigError
from flowdppo.report import figures
from flowdppo.report.runs import Evaluation, ReportRun
from flowdppo.trainer.media import HELDOUT_COLOR, HELDOUT_MARK
from flowdppo.units import KL_LABEL, KL_SENTENCE, KL_UNIT, kl_inline

# The verdict box's colour: a gain below GAIN_MIN is no gain (red); a gain whose held-out
# reward fell by more than HELDOUT_DROP is a gain with forgetting (amber); else green.
GAIN_MIN = 0.02
HELDOUT_DROP = 0.05

_MIME = {".png": "image/png", ".gif": "image/gif", ".mp4": "video/mp4"}

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:18px 0 6px}.verdict{font-size:17px;padding:10px 14px;border-radius:6px;
margin:12px 0;border:1px solid}.verdict.good{background:#eef6ee;border-color:#9c9}
.verdict.mixed{background:#fff4dd;border-color:#e0b050}.verdict.bad{background:#fbe9e7;
border-color:#e08070}.verdict.none{background:#f4f4f4;border-color:#bbb}
.note{color:#555;font-size:13px}.nw{white-space:nowrap}.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;margin:6px 0 10px}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
tr.winner td{background:#fff6d5;font-weight:600}img,video{max-width:100%;height:auto}
.evals{border:1px solid #ddd;padding:8px;border-radius:6px;flex:1 1 300px;min-width:0}.evals input{width:220px;
max-width:100%;vertical-align:middle}.evlabel{display:block}.held{color:HELD;font-weight:600}
.pair{display:flex;gap:16px;flex-wrap:wrap;align-items:flex-start}.pair figure{margin:0;
max-width:100%}figcaption{font-size:12px;color:#444;margin-bottom:4px}pre{background:#f7f7f7;
padding:8px;overflow:auto;max-height:420px;font-size:12px}details{margin:4px 0}
""".replace("HELD", HELDOUT_COLOR)

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
    ("kl_ref", f"KL to ref ({KL_LABEL})", "{:.3g}"),
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


def _heading(text: str) -> str:
    """A column heading whose unit in brackets stays on one line ("1e-3/step")."""
    name, bracket, unit = html.escape(text).partition(" (")
    return f"{name} <span class=nw>({unit}</span>" if bracket else name


def verdict_class(gain: float, heldout_change: float) -> tuple[str, str]:
    """The verdict box's colour class and its words, from the gain on the trained prompts
    and the held-out change (NaN: no held-out prompts), by GAIN_MIN and HELDOUT_DROP."""
    if not math.isfinite(gain):
        return "none", "not finished"
    if gain < GAIN_MIN:
        return "bad", "no gain"
    if math.isfinite(heldout_change) and heldout_change < -HELDOUT_DROP:
        return "mixed", "gain with forgetting"
    return "good", "gain without forgetting"


VERDICT_RULES = (
    f"Box colour: green when the trained prompts' reward gained at least +{GAIN_MIN:g} and the "
    f"held-out reward fell by no more than {HELDOUT_DROP:g}; amber when it gained but the "
    f"held-out reward fell by more than {HELDOUT_DROP:g} (forgetting); red when the gain is "
    f"below +{GAIN_MIN:g}."
)


def summary(groups: dict[str, list[ReportRun]]) -> tuple[str, str | None]:
    """The verdict box and the summary table; and the leading group (the highest reward
    after training; with one group, that group, which is not called a winner)."""
    level = _matched_kl(groups)
    several = len(groups) > 1
    stats = {g: aggregate([r.result for r in rs]) for g, rs in groups.items()}
    finished = {g: s for g, s in stats.items() if "train_after" in s}
    lead = max(finished, key=lambda g: finished[g]["train_after"][0]) if finished else None
    winner = lead if several else None
    cols = [c for c in COLUMNS if c[0] != "gain_at_matched_kl" or math.isfinite(level)]
    head = "".join(f"<th>{_heading(h)}</th>" for _, h, _ in cols)
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
        f"<div class=scroll><table><tr><th>run</th><th>algorithm</th><th>runs ok</th>{head}</tr>"
        + "".join(rows)
        + "</table></div>"
    )
    if lead is None:
        kind = "none"
        verdict = "No run has finished yet (no summary.json): the curves below are not drawn."
    else:
        s = finished[lead]
        heldout = s.get("heldout_change", (math.nan,))[0]
        kind, words = verdict_class(s["gain"][0], heldout)
        verdict = (
            f"<b>{'Winner' if several else 'Run'}: {html.escape(lead)}</b> — {words}: "
            f"evaluation reward {s['train_after'][0]:.3f} ({s['gain'][0]:+.3f} over the base "
            f"model) at KL to the reference {kl_inline(s['kl_ref'][0] * KL_UNIT)}; held-out change "
            f"{heldout:+.3f}."
        )
        if math.isfinite(level):
            best = max(finished, key=lambda g: finished[g].get("gain_at_matched_kl", (-1e9,))[0])
            verdict += (
                f"<br><span class=note>At matched KL ({kl_inline(level * KL_UNIT)}, the lowest "
                f"final KL of any run) the largest gain is {html.escape(best)}'s "
                f"({finished[best]['gain_at_matched_kl'][0]:+.3f}).</span>"
            )
        verdict += f"<br><span class=note>{VERDICT_RULES}</span>"
    table += (
        "<p class=note>Rewards are of the deterministic ODE samples of the fixed-noise "
        "evaluation on the trained prompts"
        + ("; the winner has the highest reward after training" if several else "")
        + f". {KL_SENTENCE}. With several seeds: mean ± std.</p>"
    )
    return f"<div class='verdict {kind}'>{verdict}</div>" + table, winner


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
        f"<div class=scroll><table><tr><th>run</th>{head}<th>backward</th></tr>{body}</table></div>"
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

    rewards = figures.inference_rewards(rows)
    body = "".join(
        f"<tr><td>{html.escape(str(r.get('model', '-')))}</td><td>{cell(r.get('steps'), '{:d}')}</td>"
        f"<td>{cell(r.get('nfe'), '{:d}')}</td>"
        + "".join(f"<td>{cell(r.get(key), '{:.3f}')}</td>" for key, _ in rewards)
        + f"<td>{cell(r.get('ms_per_image'), '{:.1f}')}</td><td>{html.escape(str(r.get('lora') or '-'))}</td></tr>"
        for r in rows
    )
    heads = "".join(f"<th>reward, {html.escape(name)}</th>" for _, name in rewards)
    return (
        f"<h3>{html.escape(label)}</h3><div class=scroll><table><tr><th>model</th><th>steps</th>"
        f"<th>NFE</th>{heads}<th>ms / image</th><th>LoRA</th></tr>{body}</table></div>"
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
        text += f", KL {kl_inline(row[figures.EVAL_KL])}"
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
        "<p class=note>Trained prompts, then held-out prompts (never trained on: their "
        f"captions in <span class=held>red, after “{HELDOUT_MARK.strip()}”</span>); one prompt "
        "per row, each sample's reward under it; the same noise at every evaluation.</p>"
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
