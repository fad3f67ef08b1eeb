"""``chatft eval``'s report: Markdown, the loss curves PNG beside it, and the same facts as JSON.

``report.md`` holds a table of held-out losses, each export's evaluations during training (the
exported step marked), and every model's answer to every question; ``report_curves.png``
plots, on one axis, the training and held-out loss of every model whose run's
``metrics.jsonl`` was found, and every model's held-out loss as measured here as a dashed line
(models without a run, such as a base model, appear only as that line); ``report.json`` is
:class:`~chatft.job.evaluate.EvalReport` as JSON.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from chatft.job.evaluate import EvalReport, ModelResult


def report_paths(out: Path) -> tuple[Path, Path, Path]:
    """``(report.md, report_curves.png, report.json)`` for ``--out report.md``."""
    out = out if out.suffix == ".md" else out.with_suffix(".md")
    return out, out.with_name(out.stem + "_curves.png"), out.with_suffix(".json")


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in (text.strip() or "(empty answer)").splitlines())


def _training(m: ModelResult) -> str:
    if m.training is None:
        return "not a chatft run" if m.kind != "chatft export" else "no record of its run"
    why = m.training.get("exported_because")
    return f"exported {why}" if why else f"{m.training.get('steps', '?')} steps"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(report: EvalReport, curves: str | None) -> str:
    lines = ["# chatft eval", "",
             f"- data: `{report.data}`; held out: {report.held_out}",
             f"- system prompt: {report.system if report.system else '(none)'}",
             "- held-out loss: mean negative log-likelihood per trained token, computed as "
             f"training computes it ({report.precision} on {report.device}, micro-batches of "
             f"{report.micro_batch} samples)", "",
             "## Held-out loss", "",
             "| model | kind | held-out loss | samples | trained tokens | training |",
             "|---|---|---|---|---|---|"]
    for m in report.models:
        lines.append(f"| `{_cell(m.model)}` | {m.kind} | {m.eval_loss:.4f} | {m.held_out_samples} "
                     f"| {m.trained_tokens:,} | {_cell(_training(m))} |")
    runs = [m for m in report.models if m.training and m.training.get("evaluations")]
    if runs:
        lines += ["", "## Evaluations during training", ""]
    for m in runs:
        assert m.training is not None
        exported = m.training.get("exported_step")
        lines += [f"### `{m.model}`", "", "| step | epoch | held-out loss | |", "|---|---|---|---|"]
        for e in m.training["evaluations"]:
            note = ("before training" if e["step"] == 0 else
                    "exported" if e["step"] == exported else "")
            lines.append(f"| {e['step']} | {e['epoch']:g} | {e['eval_loss']:.4f} | {note} |")
        lines.append("")
    if report.questions:
        lines += ["", "## Answers (greedy)", ""]
    for question in report.questions:
        lines += [f"### {question}", ""]
        for m in report.models:
            lines += [f"**`{m.model}`**", "", _quote(m.answers.get(question, "")), ""]
    if curves:
        lines += ["## Loss curves", "", f"![loss curves]({curves})", ""]
    return "\n".join(lines).rstrip() + "\n"


def plot_curves(report: EvalReport, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    last_step = max([r["step"] for m in report.models for r in (m.metrics or [])] + [1])
    for n, m in enumerate(report.models):
        colour = f"C{n}"
        if m.metrics:
            train = [(r["step"], r["loss"]) for r in m.metrics if "loss" in r]
            held = [(r["step"], r["eval_loss"]) for r in m.metrics if "eval_loss" in r]
            if train:
                ax.plot(*zip(*train), color=colour, alpha=0.35, linewidth=1,
                        label=f"{m.model}: train loss")
            if held:
                ax.plot(*zip(*held), "o-", color=colour, label=f"{m.model}: held-out loss")
        run = "" if m.metrics else "; no training curve"
        ax.hlines(m.eval_loss, 0, last_step, colors=colour, linestyles="dashed",
                  label=f"{m.model}: {m.eval_loss:.4f} (this evaluation{run})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean NLL per trained token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def write_report(report: EvalReport, out: Path) -> Path:
    """Write the three files (see :func:`report_paths`); returns the Markdown file."""
    md, png, js = report_paths(Path(out))
    md.parent.mkdir(parents=True, exist_ok=True)
    plot_curves(report, png)
    md.write_text(markdown(report, png.name), encoding="utf-8")
    js.write_text(json.dumps(dataclasses.asdict(report), ensure_ascii=False, indent=1),
                  encoding="utf-8")
    return md
