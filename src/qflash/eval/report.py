"""Writing an evaluation: <run>/eval/report.json, report.md, training.png and answers.jsonl.

The directory is written beside the run under a temporary name and renamed into place, so a
report is either the previous one or the new one, whole.
"""

from __future__ import annotations

import json
from pathlib import Path

from qflash.eval.evaluate import EvalResult, is_number
from qflash.paths import inside, replaced_atomically

EVAL_DIR = "eval"
PLOT = "training.png"

# What each reported number means; written into report.json and report.md.
DEFINITIONS = {
    "eval_loss": "mean next-token cross-entropy (nats) over every trained token of the held-out split",
    "perplexity": "exp(eval_loss)",
    "identity_accuracy": "share of held-out identity questions (their reference reply names data.vars.name) "
                         "whose greedy answer names the identity (case-insensitive)",
    "stop_rate": "share of greedy answers to held-out questions that ended with the end-of-turn token "
                 "within max_new_tokens",
    "spill": "share of greedy answers to control prompts (general questions outside the training data) "
             "that mention the identity's name or author (data.vars.name, data.vars.author)",
    "control_kl": "mean per-token KL(base || model), nats, of the next-token distributions on the control "
                  "prompts' base-model greedy answers (teacher-forced); 0 = same distributions",
    "control_agreement": "share of those answer tokens where the model's most likely next token is the base "
                         "model's",
    "likelihood_accuracy": "share of held-out preference pairs whose chosen answer has the higher per-token "
                           "log-probability under the model",
    "preference_accuracy": "share of held-out preference pairs whose chosen answer gained more log-probability "
                           "than the rejected one, from the starting point (base model or model.adapter) to the "
                           "fine-tuned model (DPO's reward accuracy; ties count as misses)",
    "preference_margin": "mean over held-out preference pairs of that gain, chosen minus rejected (nats)",
}
KEYS = list(DEFINITIONS)
PREFERENCE_KEYS = ("likelihood_accuracy", "preference_accuracy", "preference_margin")


def shown_keys(r: EvalResult) -> list[str]:
    """The rows of the table: a preference evaluation's and the control prompts', or the supervised ones."""
    if r.preference_pairs:
        return [k for k in KEYS if k in PREFERENCE_KEYS or k.startswith(("spill", "control"))]
    return [k for k in KEYS if k not in PREFERENCE_KEYS]


def report_dict(r: EvalResult) -> dict:
    out: dict = {"run": r.run, "identity": r.name}
    out.update(r.tuned.as_dict())
    out["base"] = r.base.as_dict()
    out["counts"] = {
        "eval_tokens": r.eval_tokens,
        "held_out_questions": len(r.questions),
        "identity_questions": r.identity_questions,
        "control_prompts": len(r.control.prompts) if r.control else 0,
        "control_answer_tokens": r.control.closeness.tokens if r.control and r.control.closeness else 0,
        "preference_pairs": r.preference_pairs,
    }
    if r.preference_pairs:
        out["preference_start"] = r.preference_start
    out["settings"] = r.settings
    out["definitions"] = DEFINITIONS
    out["notes"] = r.notes
    out["seconds"] = round(r.seconds, 1)
    return out


def _answers_rows(r: EvalResult) -> list[dict]:
    rows = []
    for q, (t, ts), (b, bs) in zip(r.questions, r.tuned_answers, r.base_answers):
        rows.append({"set": "held_out", "where": q.where, "prompt": q.text, "reference": q.reference,
                     "fine_tuned": t, "fine_tuned_stopped": ts, "base": b, "base_stopped": bs})
    if r.control:
        for p, (t, ts), (b, bs) in zip(r.control.prompts, r.control.tuned, r.control.base):
            rows.append({"set": "control", "where": f"{p.file}:{p.line}", "prompt": p.messages[-1]["content"],
                         "fine_tuned": t, "fine_tuned_stopped": ts, "base": b, "base_stopped": bs})
    return rows


def fmt(x, key: str = "") -> str:
    if not is_number(x):
        return "—"
    if key in ("identity_accuracy", "stop_rate", "spill", "control_agreement", "likelihood_accuracy",
               "preference_accuracy"):
        return f"{100 * x:.0f}%"
    return f"{x:.4f}" if abs(x) < 1000 else f"{x:,.0f}"


def markdown(r: EvalResult, plot: bool) -> str:
    d = report_dict(r)
    lines = [f"# Evaluation of `{r.run}`", ""]
    if r.name:
        lines += [f"Identity taught: **{r.name}**.", ""]
    lines += ["| metric | base model | fine-tuned |", "|---|---|---|"]
    for k in shown_keys(r):
        lines.append(f"| {k} | {fmt(d['base'][k], k)} | {fmt(d[k], k)} |")
    c = d["counts"]
    held_out = (f"Held-out: {c['preference_pairs']} preference pairs, the fine-tuned model against "
                f"{r.preference_start}. " if r.preference_pairs else
                f"Held-out: {c['eval_tokens']:,} trained tokens, {c['held_out_questions']} questions "
                f"({c['identity_questions']} identity questions), greedy answers of up to "
                f"{r.settings.get('max_new_tokens')} tokens. ")
    lines += [
        "",
        held_out + f"Control prompts: {c['control_prompts']} from `{r.settings.get('control_prompts')}`, "
        f"{c['control_answer_tokens']} answer tokens compared.",
        "",
        "## Definitions",
        "",
    ]
    lines += [f"- **{k}**: {v}" for k, v in DEFINITIONS.items()]
    if r.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in r.notes]
    if plot:
        lines += ["", "## Training", "", f"![train/eval loss, learning rate and tokens/s over steps]({PLOT})"]
    if r.control:
        lines += ["", "## Control prompts (base model / fine-tuned)", ""]
        for p, (t, _), (b, _) in zip(r.control.prompts, r.control.tuned, r.control.base):
            lines += [f"- **{_one_line(p.messages[-1]['content'])}**",
                      f"  - base: {_one_line(b)}", f"  - fine-tuned: {_one_line(t)}"]
    return "\n".join(lines) + "\n"


def _one_line(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def read_metrics(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a kill
    return rows


def plot_training(rows: list[dict], out: Path) -> bool:
    """train/eval loss, learning rate and tokens/s over steps into one PNG; False when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in rows if is_number(r.get(key)) and "step" in r]
        return [s for s, _ in pts], [v for _, v in pts]

    if not series("loss")[0]:
        return False
    preference = bool(series("rewards/margin")[0])
    fig, axes = plt.subplots(4 if preference else 3, 1, figsize=(7, 10.5 if preference else 8), sharex=True)
    axes[0].plot(*series("loss"), label="train loss", lw=1)
    steps, values = series("eval_loss")
    if steps:
        axes[0].plot(steps, values, "o-", label="held-out loss", lw=1.5)
    axes[0].set_ylabel("loss (nats/token)")
    axes[0].legend()
    axes[1].plot(*series("lr"), color="tab:green", lw=1)
    axes[1].set_ylabel("learning rate")
    axes[2].plot(*series("tokens_per_s"), color="tab:gray", lw=1)
    axes[2].set_ylabel("tokens/s")
    if preference:  # preference tuning: the rewards of chosen and rejected, their margin, the accuracy
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margin"):
            axes[3].plot(*series(key), label=key.split("/")[1], lw=1)
        axes[3].set_ylabel("reward")
        twin = axes[3].twinx()
        twin.plot(*series("rewards/accuracy"), color="black", ls=":", lw=1, label="accuracy")
        twin.set_ylabel("accuracy")
        twin.set_ylim(-0.05, 1.05)
        axes[3].legend(loc="upper left")
    axes[-1].set_xlabel("optimizer step")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True


def write_report(r: EvalResult, run_dir: Path) -> Path:
    """<run>/eval/ with report.json, report.md, training.png (when metrics exist) and answers.jsonl; atomic."""
    run_dir = Path(run_dir)
    final = inside(run_dir, EVAL_DIR, "eval directory")
    with replaced_atomically(final, "eval") as tmp:
        plotted = plot_training(read_metrics(run_dir / "metrics.jsonl"), tmp / PLOT)
        (tmp / "report.json").write_text(json.dumps(report_dict(r), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / "report.md").write_text(markdown(r, plotted), encoding="utf-8")
        with open(tmp / "answers.jsonl", "w", encoding="utf-8") as f:
            for row in _answers_rows(r):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return final


def print_table(r: EvalResult, where: Path) -> None:
    from rich.table import Table

    from qflash.ui import console

    d = report_dict(r)
    table = Table(title=f"qflash eval: {r.run}" + (f" (identity: {r.name})" if r.name else ""))
    table.add_column("metric")
    table.add_column("base model", justify="right")
    table.add_column("fine-tuned", justify="right")
    for k in shown_keys(r):
        table.add_row(k, fmt(d["base"][k], k), fmt(d[k], k))
    console.print(table)
    c = d["counts"]
    held_out = (f"{c['preference_pairs']} held-out preference pairs (against {r.preference_start})"
                if r.preference_pairs else f"{c['held_out_questions']} held-out questions ({c['identity_questions']} "
                f"about the identity), {c['eval_tokens']:,} held-out tokens")
    console.print(f"{held_out}, {c['control_prompts']} control prompts; {r.seconds:.0f}s")
    for n in r.notes:
        console.print(f"[yellow]note[/]: {n}")
    plot = f", {where / PLOT}" if (where / PLOT).is_file() else ""
    console.print(f"report: {where / 'report.md'}  ({where / 'report.json'}{plot}, {where / 'answers.jsonl'})")
