#!/usr/bin/env python
# /// script
# requires-python = ">=3.10"
# dependencies = [
#   "transformers>=5.0", "numpy>=2.0", "scipy>=1.11", "matplotlib>=3.8", "markdown-it-py", "regex", "tqdm", "pyyaml",
#   "psutil",
# ]
# ///
"""The report of a study: report.md, report.html and report.json from the files its steps wrote; its sections are
listed in docs/study.md (The report). Every sentence of conclusion is written from those files' numbers, never
stronger than their intervals. A sweep's report is sweep_report.py. run_study.py writes the report after its last
step; on its own it reports a study folder from the plan.json run_study.py wrote there::

    python study_report.py study_runs/cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import io
import itertools
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np

import run_transfer
from cloze import question_lang_from_stem, question_stem, read_predictions
from study_common import InputError, exit_on_input_error, write_bytes_atomic, write_json_atomic, write_text_atomic
from study_config import REPO_DIR, SETTINGS, VARIANT_TITLES
from study_runner import fmt_time, read_step_seconds, unfinished_steps, utc_now

if TYPE_CHECKING:  # the report reads any object with these fields (run_study's, or one read back from plan.json)
    from run_study import Plan, Run


def configuration_text(config: dict) -> str:
    """How a study was configured, in one line: its file, --set, the flags that shape its plan, a sweep's values."""
    if not config:
        return "(not recorded)"
    parts = [f"preset {config['preset']} ({config['file']})", *(f"--set {text}" for text in config["set"])]
    for flag, value in config["flags"].items():
        values = "" if value is True else " " + " ".join(map(str, value if isinstance(value, list) else [value]))
        parts.append(f"--{flag}{values}")
    parts += [f"--sweep {key}={','.join(map(json.dumps, vs))}" for key, vs in (config.get("sweep") or {}).items()]
    if "cell" in config:
        parts.append("this cell: " + ", ".join(f"{key}={json.dumps(value)}" for key, value in config["cell"].items()))
    return ", ".join(parts)


# --------------------------------------------------------------------------------------
# A report is a list of Markdown blocks; the words, numbers and figures every section shares
# --------------------------------------------------------------------------------------


def table(headers: list[str], rows: list[list]) -> str:
    return "\n".join(run_transfer.markdown_table(headers, rows))


def bullets(items: list[str]) -> str:
    return "\n".join(f"- {item}" for item in items)


def image(path: str, caption: str) -> str:
    return f"![{caption}]({path})\n\n*{caption}*"


PAGE_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
    "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px;"
    "text-align:left}th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}code{background:#f5f5f5;"
    "padding:0 3px}"
)


def write_pages(md: Path, blocks: list[str], title: str) -> Path:
    """Write the blocks (empty ones left out) to ``md``, and to the .html beside it as markdown-it-py renders them
    (raw HTML escaped); returns the .html's path."""
    from markdown_it import MarkdownIt

    text = "\n\n".join(block for block in blocks if block) + "\n"
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(text)
    page = md.with_suffix(".html")
    write_text_atomic(md, text)
    write_text_atomic(page, f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}'
                            f"</title><style>{PAGE_CSS}</style></head><body>\n{body}</body></html>\n")  # fmt: skip
    return page


def _f(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def _ci(ci) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def _read_json(path) -> dict | None:
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _group_runs(plan: Plan, key: str, setting: str | None = None) -> list[Run]:
    """The runs of a run group ("<lang>/<variant>"), of one setting if given."""
    return [r for r in plan.runs if f"{r.lang}/{r.variant}" == key and setting in (None, r.setting)]


def _models(plan: Plan, key: str, group: dict, final: str = "") -> list[tuple[str, str, list[str]]]:
    """(label, name, probing folders) of the base model and of each CPT setting of a group."""
    settings = [(f"CPT {s.replace('_', ' ')}{final}", s, [r.eval_dir for r in _group_runs(plan, key, s)])
                for s in group["settings"]]  # fmt: skip
    return [("base model", "base", [group["base_eval"]]), *settings]


def _tier_indices(truth: dict, lang: str) -> dict[str, list[int]]:
    tiers: dict[str, list[int]] = {}
    for record in truth["questions"][lang]:
        tiers.setdefault(record["tier"], []).append(record["index"])
    return tiers


def _figure(rows: int, cols: int, width: float, height: float, **kwargs):
    """(figure, 2-D array of axes with a grid), width and height per axes, drawn without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, **kwargs)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    return fig, axes


def _save(fig, figures: Path, name: str) -> str:
    """Save a PNG through a temporary name and a rename, like every other output; returns its path in the report."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(figures / name, buffer.getvalue())
    return f"figures/{name}"


# --------------------------------------------------------------------------------------
# The report of a study
# --------------------------------------------------------------------------------------


def write_reports(plan: Plan) -> dict:
    """The report of a study; of a sweep, each cell's report, then the sweep's (sweep_report.py)."""
    if not plan.cells:
        return write_report(plan)
    from sweep_report import write_sweep_report  # here, not at the top: sweep_report builds on this module

    for cell in plan.cells.values():
        write_report(cell)
    return write_sweep_report(plan)


def write_report(plan: Plan) -> dict:
    """Write report.md, report.html and report.json into the plan's output folder. Returns their paths, the number
    of steps and the steps that did not finish (id -> why)."""
    out, preset, unfinished = Path(plan.out), plan.preset, unfinished_steps(plan)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    values = dataclasses.asdict(preset) if dataclasses.is_dataclass(preset) else dict(vars(preset))
    record: dict = {"preset": preset.name, "generated": utc_now(), "configuration": {**plan.config, "values": values},
                    "status": _status(plan, unfinished)}  # fmt: skip
    doc = [
        f"# Cross-lingual culture transfer study: preset `{preset.name}`",
        f"Configuration: {configuration_text(plan.config)}. Every effective value is in `plan.json` and `report.json`.",
        *_unfinished_banner(plan, unfinished),
        f"Generated {record['generated']}. {preset.description} Every number below is read from a file a step wrote "
        "(`report.json` collects them, or the path of the file that holds them); `commands.sh` holds every command of "
        "the study and `logs/<step>.log` its output.",
    ]
    record["machine"] = _report_machine(doc, plan)
    world = plan.dirs.get("world")
    truth = _read_json(Path(world) / "truth.json") if preset.synthetic and world else None
    anchors = truth and {"native", "anchors"} <= {g["variant"] for g in plan.groups.values()}
    sections = {  # in the report's order
        "world": _report_world(doc, plan, truth) if truth else None,
        "questions": _report_questions(doc, plan),
        "transfer": _report_transfer(doc, plan, figures),
        "manipulation_checks": _report_manipulation_checks(doc, plan),
        "anchors": _report_anchors(doc, plan, truth, figures) if anchors else None,
        "diagnostic": _report_diagnostic(doc, plan, figures),
        "density": _report_density(doc, plan, truth),
        "packing": _report_packing(doc, plan),
    }
    record["sections"] = {name: section for name, section in sections.items() if section}
    md = out / "report.md"
    page = write_pages(md, doc, f"Study report ({preset.name})")
    write_json_atomic(out / "report.json", record)
    return {"md": md, "html": page, "json": out / "report.json", "steps": len(plan.steps), "unfinished": unfinished}


def _status(plan: Plan, unfinished: dict[str, str]) -> dict:
    return {"complete": not unfinished, "steps": len(plan.steps), "finished": len(plan.steps) - len(unfinished),
            "unfinished": [{"step": step_id, "why": why} for step_id, why in unfinished.items()]}  # fmt: skip


def _unfinished_banner(plan: Plan, unfinished: dict[str, str]) -> list[str]:
    if not unfinished:
        return []
    return [
        f"**UNFINISHED: {len(unfinished)} of {len(plan.steps)} steps of this study have no finished run.** What "
        "follows is what the finished steps wrote, and no conclusion covers what is missing. Run the study's command "
        "again to finish it. The steps that did not finish:",
        bullets([f"`{step_id}`: {why}" for step_id, why in unfinished.items()]),
    ]


def _report_machine(doc: list[str], plan: Plan) -> dict:
    """The machine, the wall time of the last invocation that ran steps, its load, and the seconds per step kind."""
    import platform

    import torch

    state = Path(plan.state_dir or plan.out)
    timings, run = read_step_seconds(state), _read_json(state / "timings.json") or {}
    samples, jobs, wall = run.get("load_average_samples") or [], run.get("jobs"), run.get("wall_s_this_invocation")
    load = {"mean": float(np.mean(samples)), "min": min(samples), "max": max(samples)} if samples else None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    total = sum(timings.get(s.id, 0.0) for s in plan.steps)
    text = f"Machine: {os.cpu_count()} CPU cores, device {device}, {platform.platform()}."
    if wall is not None:
        text += (f" The last invocation that ran steps took {fmt_time(wall)} (wall), {jobs} steps at a time; the steps "
                 f"took {fmt_time(total)} in all.")  # fmt: skip
    if load:
        text += (f" 1-minute load average meanwhile: mean {load['mean']:.1f} (min {load['min']:.1f}, max "
                 f"{load['max']:.1f}), the study's own {jobs} jobs included.")  # fmt: skip
    by_kind: dict[str, list[float]] = {}
    for step in (s for s in plan.steps if s.id in timings):
        by_kind.setdefault(step.kind, []).append(timings[step.id])
    rows = [[kind, len(v), f"{sum(v):.0f}", f"{max(v):.0f}"] for kind, v in by_kind.items()]
    doc += ["## Run", text, table(["step kind", "steps", "seconds (sum)", "seconds (longest)"], rows)]
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "device": device, "steps_wall_s": wall,
            "jobs": jobs, "load_average": load, "step_seconds_total": total,
            "step_seconds": {s.id: timings.get(s.id) for s in plan.steps}}  # fmt: skip


def _report_world(doc: list[str], plan: Plan, truth: dict) -> dict:
    """The tiers of facts with their planted counts and densities, and the model and its training budgets."""
    base, world = Path(plan.dirs["base"]), _read_json(Path(plan.dirs["world"]) / "world.json") or {}
    stats, config = _read_json(base / "data_stats.json") or {}, _read_json(base / "config.json") or {}
    rows = [[lang, tier, d["facts"], d["en_statements"], d["tgt_statements"], _f(d["en_density"], ".2e"),
             _f(d["tgt_density"], ".2e"), "∞" if d["tgt_over_en"] is None else _f(d["tgt_over_en"], ".1f")]
            for lang, tiers in truth["densities"].items() for tier, d in tiers.items() if tier != "all"]  # fmt: skip
    params, pre, cpt = stats.get("parameters"), plan.preset.pretrain, plan.preset.cpt  # run_pretrain.py counts them
    tokens = stats.get("tokens")
    corpus = f"{world.get('en_corpus', {}).get('documents', '?')} documents" + (
        f", {tokens:,} tokens" if isinstance(tokens, int) else ""
    )
    size = f"{params / 1e6:.2f}M parameters" if params else "size unknown"
    tiers = table(["language", "tier", "facts", "English statements", "target statements", "English density",
                   "target density", "target / English"], rows)  # fmt: skip
    doc += [
        "## The synthetic world and the model",
        "A generated world with planted ground truth (`synthetic_world.py`; its tiers of facts: "
        "docs/decomposition.md). Facts of the **low** tier are as frequent in the target corpus as high ones and "
        f"{world.get('arguments', {}).get('low_resource_ratio', '?')}x rarer in English; the table gives every tier's "
        "planted statements per corpus. Chance is 0.25 whatever the frequencies (a question's four options have "
        "identical planted counts).",
        tiers,
        f"Base model: Qwen2 architecture, hidden {config.get('hidden_size', '?')}, "
        f"{config.get('num_hidden_layers', '?')} layers, vocabulary {config.get('vocab_size', '?')} ({size}), "
        f"pretrained on the English corpus ({corpus}) for {pre.get('max_steps')} steps of "
        f"{pre.get('per_device_train_batch_size')} x {pre.get('block_size')} tokens. Continual pretraining: "
        f"{cpt.get('max_steps')} steps of {cpt.get('per_device_train_batch_size')} x {cpt.get('block_size')} tokens "
        f"per run, a checkpoint every {cpt.get('save_steps')} steps, seeds "
        f"{', '.join(map(str, sorted({r.seed for r in plan.runs})))}, English replay "
        f"{plan.preset.build.get('replay_ratio', 0):.0%} of the CPT tokens.",
    ]
    return {"densities": truth["densities"], "base_params": params, "base_data_stats": stats}


#: Ties above this share of a file's items are flagged (run_eval.py warns at the same rate).
TIE_FLAG_RATE = 0.05
#: What the questions section shows of a file's final accuracy.json entry (mean over seeds): its name -> the field.
FINAL_FIELDS = {"tie_rate": "tie_rate", "accuracy_first": "accuracy", "accuracy_fractional": "accuracy_fractional",
                "ties_advantage": "ties_advantage"}  # fmt: skip


def _final_accuracy(eval_dir: str) -> dict | None:
    """The last checkpoint's entry of a probing output's accuracy.json, or None."""
    checkpoints = (_read_json(Path(eval_dir) / "accuracy.json") or {}).get("checkpoints")
    return checkpoints[-1] if checkpoints else None


def _report_questions(doc: list[str], plan: Plan) -> dict:
    """Per model and question file, the tie rate and the accuracy under both tie rules at the final checkpoint
    (run_eval.py's accuracy.json), files above TIE_FLAG_RATE flagged."""
    doc += [
        "## Questions: ties and the two tie rules",
        "Tie rules **first** (the paper's) and **fractional**: docs/probing.md (ties and position bias), which also "
        "says where probing records each question file's answer positions and what always answering option 0 scores. "
        "At the final checkpoint; CPT settings are the mean over seeds.",
    ]
    section = {}
    for key, group in plan.groups.items():
        models = _models(plan, key, group)
        finals = {name: [f for f in map(_final_accuracy, dirs) if f] for _, name, dirs in models}
        if not any(finals.values()):
            doc.append(f"{key}: no probing output found.")
            continue
        entries, labels = [], {name: label for label, name, _ in models}
        for name, stem in itertools.product(labels, [Path(q).stem for q in group["questions"]]):
            per_seed = [final["accuracy"][stem] for final in finals[name] if stem in final["accuracy"]]
            if per_seed:
                entries.append({"model": name, "questions": stem, "seeds": len(per_seed),
                                "final_steps": sorted({final["step"] for final in finals[name]}),
                                "ties": [a["ties"] for a in per_seed],
                                **{shown: float(np.mean([a[field] for a in per_seed]))
                                   for shown, field in FINAL_FIELDS.items()}})  # fmt: skip
        flagged = [f"{labels[e['model']]}, {e['questions']}: {e['tie_rate']:.1%} of items tie for the best score "
                   f"(above {TIE_FLAG_RATE:.0%}): read the fractional rule."
                   for e in entries if e["tie_rate"] > TIE_FLAG_RATE]  # fmt: skip
        rows = [[labels[e["model"]], e["questions"], e["seeds"], ", ".join(map(str, e["final_steps"])),
                 _f(e["tie_rate"]), _f(e["accuracy_first"]), _f(e["accuracy_fractional"]),
                 f"{e['ties_advantage']:+.3f}"] for e in entries]  # fmt: skip
        header = ["model", "questions", "seeds", "final step", "tie rate", "acc. (first rule)",
                  "acc. (fractional rule)", "first − fractional"]  # fmt: skip
        doc += [
            f"### {key if plan.preset.synthetic else group['lang']}",
            table(header, rows),
            bullets(flagged or [f"Ties stay at or below {TIE_FLAG_RATE:.0%} of the items for every model and file."]),
        ]
        section[key] = {"final": entries, "tie_flags": flagged}
    return section


def _report_transfer(doc: list[str], plan: Plan, figures: Path) -> dict:
    """Per run group trained in both settings: run_transfer.py's figures and its transfer.md, the one rendering of
    transfer.json (report.json keeps its path)."""
    doc += ["## Transfer: with minus without bridges (the paper's measurement)",
            "Each group's tables are its `transfer.md` (`run_transfer.py`)."]  # fmt: skip
    section = {}
    for key, group in plan.groups.items():
        if not set(SETTINGS) <= set(group["settings"]):
            continue  # a group trained in one setting serves the anchors comparison only
        lang, variant, folder = group["lang"], group["variant"], Path(group["transfer"])
        title = f"{lang}, {VARIANT_TITLES.get(variant, variant)}" if plan.preset.synthetic else lang
        doc.append(f"### {title}")
        result = _read_json(folder / "transfer.json")
        if not result:
            doc.append(f"No transfer analysis at `{folder}/transfer.json` (the step did not finish).")
            continue
        for name, caption in (("transfer_curves", "accuracy during CPT with (blue) and without (orange) bridges"),
                              ("transfer_summary", "mean gap over the curve per direction")):  # fmt: skip
            if (folder / f"{name}.png").is_file():
                write_bytes_atomic(figures / f"{lang}-{variant}-{name}.png", (folder / f"{name}.png").read_bytes())
                doc.append(image(f"figures/{lang}-{variant}-{name}.png", f"{title}: {caption}"))
        doc.append(run_transfer.transfer_markdown(result, level=4, standalone=False))
        section[key] = {"transfer_json": str(folder / "transfer.json")}
    return section


#: Confidence of the manipulation checks' intervals (exact binomial over the items of a check).
CHECK_CONFIDENCE = 0.95
#: The manipulation checks (run_eval.py's manipulation_checks.json), in the order the report shows them.
CHECKS = ("name alignment", "embedding match", "English retention", "target learning")


def _binomial_ci(accuracy: float, n: int) -> list[float]:
    """Exact (Clopper-Pearson) interval of an accuracy over n items; a mean over seeds counts as one proportion of
    the same n items (seeds probe the same items)."""
    from scipy.stats import binomtest

    ci = binomtest(round(accuracy * n), n).proportion_ci(CHECK_CONFIDENCE, method="exact")
    return [float(ci.low), float(ci.high)]


def _final_checks(eval_dir: str, lang: str) -> tuple[int, dict] | None:
    """(step, {(check, what): (accuracy, items, chance)}) at the last checkpoint of a probing output's
    manipulation_checks.json, or None. Items per tier come from its item_tiers record, a question file's chance from
    the accuracy.json beside it."""
    data = _read_json(Path(eval_dir) / "manipulation_checks.json")
    if not data or not data.get("checkpoints"):
        return None
    final, items = data["checkpoints"][-1], (data.get("item_tiers") or {}).get("items_per_tier") or {}
    questions = (_read_json(Path(eval_dir) / "accuracy.json") or {}).get("questions") or {}
    values = {}
    for check, name in (("name alignment", "name_alignment"), ("embedding match", "embedding_match")):
        for direction, entry in (final.get(name) or {}).items():
            values[(check, direction)] = (entry["accuracy"], entry["n"], entry["chance"])
    wanted = {"en": ("English retention", ("high", "en_only")), lang: ("target learning", ("absent",))}
    for stem, by_tier in (final.get("tier_accuracy") or {}).items():
        check, tiers = wanted.get(question_lang_from_stem(stem), (None, ()))
        for tier in (t for t in tiers if t in by_tier and items.get(t)):
            chance = (questions.get(stem) or {}).get("chance_accuracy")
            values[(check, f"{stem}, {tier} facts")] = (by_tier[tier], items[tier], chance)
    return final["step"], values


def _report_manipulation_checks(doc: list[str], plan: Plan) -> dict:
    """Per run group: the four checks at the base model and at the final checkpoint per CPT setting (mean over
    seeds, exact binomial interval), whether each is at chance, and what that means for reading the gap."""
    section = {}
    for key, group in plan.groups.items():
        models = _models(plan, key, group, final=" (final)")
        finals = {name: [f for f in (_final_checks(d, group["lang"]) for d in dirs) if f] for _, name, dirs in models}
        if not any(finals.values()):
            continue
        if not section:
            doc += ["## Manipulation checks: what the gap can be read as",
                    "At the base model and at the final checkpoint of each CPT setting, mean over seeds "
                    f"(docs/decomposition.md). Intervals: exact binomial {CHECK_CONFIDENCE:.0%} over the items of a "
                    "check; **at chance** when the interval covers chance."]  # fmt: skip
        labels, results = {name: label for label, name, _ in models}, _mean_checks(finals)
        ordered = sorted(results, key=lambda cw: CHECKS.index(cw[0]))  # stable: as the files order them
        entries = [e for check_what in ordered for e in results[check_what].values()]
        sentences = [s for cw in ordered if (s := _check_sentence(*cw, results[cw], labels, group["lang"]))]
        rows = [[e["check"], e["what"], labels[e["model"]], e["seeds"], ", ".join(map(str, e["steps"])),
                 f"{e['accuracy']:.3f} [{e['ci'][0]:.3f}, {e['ci'][1]:.3f}]", e["n"],
                 ", ".join(f"{a:.3f}" for a in e["per_seed"]), _f(e["chance"]),
                 f"**{e['relation']}**" if e["relation"] == "at chance" else e["relation"]]
                for e in entries]  # fmt: skip
        header = ["check", "direction / questions", "model", "seeds", "step", f"accuracy [{CHECK_CONFIDENCE:.0%} CI]",
                  "items", "per seed", "chance", "vs chance"]  # fmt: skip
        doc += [
            f"### {key if plan.preset.synthetic else group['lang']}",
            table(header, rows),
            bullets(sentences),
        ]
        files = [str(Path(d) / "manipulation_checks.json") for _, _, dirs in models for d in dirs]
        section[key] = {"files": [f for f in files if Path(f).is_file()], "confidence": CHECK_CONFIDENCE,
                        "checks": entries, "sentences": sentences}  # fmt: skip
    return section


def _mean_checks(finals: dict[str, list[tuple[int, dict]]]) -> dict:
    """{(check, what): {model: entry}}: each check's accuracy per model, mean over seeds, with its exact binomial
    interval and where that lies against chance."""
    results: dict = {}
    for name, found in finals.items():
        for check_what in dict.fromkeys(cw for _, values in found for cw in values):
            per_seed = [values[check_what] for _, values in found if check_what in values]
            accuracy, n, chance = float(np.mean([v[0] for v in per_seed])), per_seed[0][1], per_seed[0][2]
            ci = _binomial_ci(accuracy, n)
            relation = "–" if chance is None else "at chance" if ci[0] <= chance <= ci[1] else (
                "above chance" if ci[0] > chance else "below chance")  # fmt: skip
            results.setdefault(check_what, {})[name] = {
                "check": check_what[0], "what": check_what[1], "model": name, "seeds": len(per_seed),
                "steps": sorted({step for step, values in found if check_what in values}), "accuracy": accuracy,
                "per_seed": [v[0] for v in per_seed], "n": n, "chance": chance, "ci": ci,
                "relation": relation}  # fmt: skip
    return results


#: What a check at chance after CPT means for reading the gap: name checks (and, when with bridges too, the gap).
ALIGNMENT_AT_CHANCE = {
    "name alignment": ("names are not aligned outside the bridge",
                       "a with-minus-without gap cannot be knowledge crossing through aligned names."),
    "embedding match": ("an entity's two names are not nearest neighbours in the input embeddings",
                        "whatever links the names does not live in the embedding table (name alignment probes the "
                        "whole model)."),
}  # fmt: skip


def _check_sentence(check: str, what: str, results: dict, labels: dict, lang: str) -> str | None:
    """The reading of a check that limits what the gap can be read as: the base model at chance on English facts or
    above chance on facts it never saw, or a CPT setting at chance. None otherwise (the table says the rest)."""
    base, cpt = results.get("base"), [name for name in results if name != "base"]
    chance = next(iter(results.values()))["chance"]
    if chance is None or not cpt:
        return None

    def shown(names: list[str]) -> str:
        each = [f"{labels[n]} {results[n]['accuracy']:.3f} [{results[n]['ci'][0]:.3f}, {results[n]['ci'][1]:.3f}] "
                f"{results[n]['relation']}" for n in names]  # fmt: skip
        return "; ".join(each) + f" (chance {chance:.3f})"

    head = f"{check.capitalize()} ({what})"
    if check == "English retention" and base and base["relation"] == "at chance":
        return (f"**{head}: the base model is at chance**: {shown(['base'])}: it does not know these English facts, "
                "so a gap on them cannot be knowledge from English.")  # fmt: skip
    if check == "target learning" and base and base["relation"] == "above chance":
        return (f"**{head}: the base model is above chance** on facts it never saw: {shown(['base'])}: the questions "
                "give their answers away (check their options).")  # fmt: skip
    at = [name for name in cpt if results[name]["relation"] == "at chance"]
    if not at:
        return None
    if check in ALIGNMENT_AT_CHANCE:
        meaning, with_bridges = ALIGNMENT_AT_CHANCE[check]
        aligned = results.get("bridges", {}).get("relation") == "above chance"
        return (f"**{head} is at chance** after CPT: {shown(at)}: {meaning}"
                + (f"; with bridges too, so {with_bridges}" if "bridges" in at else ".")
                + (f" With bridges it is above chance ({shown(['bridges'])}): bridges aligned the names." if aligned
                   else ""))  # fmt: skip
    learned = [name for name in cpt if results[name]["relation"] == "above chance"]
    if check == "English retention":
        meaning = "CPT erased these English facts there: a gap at the end of CPT cannot rest on English knowledge."
    elif learned:
        meaning = (f"CPT did not teach these runs the facts only the {lang} corpus states, and taught them to "
                   f"{shown(learned)}: the gap on them (the skill measure) compares a model that learned {lang} facts "
                   "with one that did not.")  # fmt: skip
    else:
        meaning = (
            f"CPT did not teach the facts only the {lang} corpus states: at this scale the model did not learn "
            f"{lang} facts, so the gap on them (the skill measure) compares models that know none of them."
        )
    before = f"base model {base['accuracy']:.3f}; " if base else ""
    return f"**{head} is at chance** after CPT: {before}{shown(at)}: {meaning}"


def _report_anchors(doc: list[str], plan: Plan, truth: dict, figures: Path) -> dict:
    """Anchors − control per direction and tier of facts: accuracy with shared Latin names minus with native-script
    names, pooled over the settings both variants ran and per setting."""
    doc += ["## Anchors vs control: shared entity names and the frequency asymmetry",
            "Difference = accuracy with English's Latin names in the target language (anchors) − with its own script "
            "(control), per tier, pooled over the CPT settings both variants ran and per setting."]  # fmt: skip
    section = {}
    for lang in sorted({g["lang"] for g in plan.groups.values()}):
        native, anchors = _group_runs(plan, f"{lang}/native"), _group_runs(plan, f"{lang}/anchors")
        if not (native and anchors and all((Path(r.eval_dir) / "accuracy.json").is_file() for r in native + anchors)):
            doc.append(f"{lang}: probing results of both variants are missing; nothing to compare.")
            continue
        entries, curves, steps = _anchor_differences(lang, native, anchors, truth)
        shared = sorted({e["setting"] for e in entries if e["setting"] != "pooled"})
        caption = (f"{lang}: accuracy during CPT with shared Latin names (anchors) and native-script names (control), "
                   f"mean over seeds ({' and '.join(s.replace('_', ' ') for s in shared)}); step 0 is the base "
                   "model")  # fmt: skip
        rows = [[run_transfer.direction_words(e["direction"], lang), e["tier"], e["setting"].replace("_", " "),
                 e["questions"], e["run_pairs"], _f(e["accuracy_anchors"]), _f(e["accuracy_control"]),
                 run_transfer.gap_text(e, "difference"), run_transfer.verdict_cell(e["verdict"])] for e in entries]  # fmt: skip
        header = ["direction", "tier", "CPT setting", "questions", "run pairs", "mean acc. anchors",
                  "mean acc. control", "difference [95% CI]", "verdict"]  # fmt: skip
        primary = "pooled" if len(shared) > 1 else shared[0]
        conclusions = _asymmetry(lang, {(e["direction"], e["tier"]): e for e in entries if e["setting"] == primary})
        doc += [
            f"### {lang}: anchors − control",
            image(_plot_anchors(lang, steps, curves, plan, truth, figures), caption),
            table(header, rows),
            run_transfer.UNDETERMINED_TEXT if any(e["verdict"] == "undetermined" for e in entries) else "",
            bullets(conclusions),
        ]
        section[lang] = {"steps": steps, "comparisons": entries, "conclusions": conclusions}
    return section


def _anchor_differences(lang: str, native: list[Run], anchors: list[Run], truth: dict) -> tuple[list, dict, list]:
    """Anchors − control per direction, tier and setting (pooled first where both ran both settings), the curves of
    the first for the figure, and the steps both variants share."""
    results = {(r.variant, r.setting, r.seed): run_transfer.read_run(r.eval_dir, r.setting) for r in native + anchors}
    steps = sorted(set.intersection(*(set(x.steps) for x in results.values())))
    seeds = sorted({r.seed for r in native} & {r.seed for r in anchors})
    shared = [s for s in SETTINGS if any(r.setting == s for r in native) and any(r.setting == s for r in anchors)]

    def credit(variant: str, settings: list[str], stem: str, indices: list[int]) -> np.ndarray:
        """Run pairs (settings x seeds) x shared steps x the given questions."""
        found = [results[(variant, setting, seed)] for setting in settings for seed in seeds]
        return np.stack([x.correct[stem][[x.steps.index(t) for t in steps]][:, indices] for x in found])

    entries, curves = [], {}
    for question_lang, (tier, indices) in itertools.product((lang, "en"), sorted(_tier_indices(truth, lang).items())):
        stem = question_stem(lang, question_lang)
        for setting in ["pooled", *shared] if len(shared) > 1 else shared:
            settings = shared if setting == "pooled" else [setting]
            a, n = credit("anchors", settings, stem, indices), credit("native", settings, stem, indices)
            stats = run_transfer.analyse_direction(a, n, 1000, 0, 0.95)
            curves.setdefault((question_lang, tier), (stats["accuracy_with"], stats["accuracy_without"]))
            entries.append({"direction": f"en->{lang}" if question_lang == lang else f"{lang}->en", "tier": tier,
                            "setting": setting, "questions": len(indices), "run_pairs": int(a.shape[0]),
                            "accuracy_anchors": float(np.mean(stats["accuracy_with"])),
                            "accuracy_control": float(np.mean(stats["accuracy_without"])),
                            "difference": stats["mean_gap"], "difference_ci": stats["mean_gap_ci"],
                            "final_difference": stats["final_gap"], "final_difference_ci": stats["final_gap_ci"],
                            "verdict": stats["verdict"]})  # fmt: skip
    return entries, curves, steps


def _asymmetry(lang: str, pooled: dict) -> list[str]:
    """The frequency asymmetry English -> target, as a sentence only as strong as the intervals."""
    high, low = pooled.get((f"en->{lang}", "high")), pooled.get((f"en->{lang}", "low"))
    if not high or not low:
        return []
    if high["difference_ci"][0] > 0 and high["difference_ci"][0] > low["difference_ci"][1]:
        return [f"Frequency asymmetry (English → {lang}): shared names carried facts frequent in English into {lang} "
                f"({high['difference']:+.3f}) more than facts rare in English ({low['difference']:+.3f}); the "
                "intervals do not overlap."]  # fmt: skip
    return [f"No evidence here of a frequency asymmetry English → {lang}: the high-tier interval "
            f"{_ci(high['difference_ci'])} does not lie above 0 and above the low-tier interval "
            f"{_ci(low['difference_ci'])}."]  # fmt: skip


#: The tiers of facts (synthetic_world.TIERS) in a figure title's few words.
TIER_SHORT = {"high": "frequent in English", "low": "rare in English", "absent": "never in English",
              "en_only": "never in the target corpus"}  # fmt: skip


def _plot_anchors(lang, steps, curves, plan, truth, figures) -> str:
    """Accuracy of both variants during CPT per question language (rows) and tier (columns), from the base model."""
    base, tiers = {}, _tier_indices(truth, lang)
    for variant in ("anchors", "native"):
        group = plan.groups.get(f"{lang}/{variant}")
        if group and (Path(group["base_eval"]) / "accuracy.json").is_file():
            by_stem = read_predictions(group["base_eval"])[1]
            base[variant] = {stem: next(iter(v.values())) for stem, v in by_stem.items() if v}
    fig, axes = _figure(2, len(tiers), 5, 3.2, sharey=True)
    for (r, question_lang), (c, tier) in itertools.product(enumerate((lang, "en")), enumerate(sorted(tiers))):
        ax, stem = axes[r, c], question_stem(lang, question_lang)
        for variant, values, color in zip(("anchors", "native"), curves[(question_lang, tier)], ("#2ca02c", "#7f7f7f")):
            xs, ys = list(steps), list(values)
            if stem in base.get(variant, {}):
                xs, ys = [0, *xs], [float(np.mean(base[variant][stem][tiers[tier]])), *ys]
            label = "anchors (shared Latin names)" if variant == "anchors" else "control (native-script names)"
            ax.plot(xs, ys, marker="o", markersize=3, color=color, label=label)
        ax.axhline(0.25, color="black", linewidth=0.6, linestyle=":")
        direction = f"English → {lang}" if question_lang == lang else f"{lang} → English"
        ax.set_title(f"{question_lang} questions ({direction}), {tier} tier: {TIER_SHORT.get(tier, tier)}", fontsize=9)
        ax.set(xlabel="CPT step", ylim=(0, 1.02), ylabel="cloze accuracy" if c == 0 else None)
    axes[0, 0].legend(fontsize=8, loc="best")
    fig.suptitle(f"{lang}: shared names vs native names (dotted: chance)", fontsize=10)
    fig.tight_layout()
    return _save(fig, figures, f"{lang}-anchors_vs_control.png")


#: The diagnostic's three contexts and the line style of each CPT setting in its figure.
DIAGNOSTIC_LOSSES = {"alone": "#7f7f7f", "after_own_context": "#1f77b4", "after_mismatched_context": "#d62728"}
SETTING_STYLES = {"bridges": "-", "no_bridges": "--", "mismatched_bridges": ":"}


def _report_diagnostic(doc: list[str], plan: Plan, figures: Path) -> dict:
    """The bridge diagnostic at the final checkpoint per group and CPT setting (mean over seeds), and its figure."""
    doc += ["## Bridge diagnostic: does the model use the other side in context?",
            "Loss of a held-out pair's second side in three contexts (docs/probing.md, the bridge diagnostic), final "
            "checkpoint, mean over seeds. The model reads its own side when that lowers the loss by over 0.05 in "
            "every seed and another pair's side helps less."]  # fmt: skip
    section, rows, curves = {}, [], {}
    for key, group in plan.groups.items():
        for setting in group["settings"]:
            results = [_read_json(Path(r.eval_dir) / "bridge_diagnostic.json") for r in _group_runs(plan, key, setting)]
            results = [x for x in results if x and x.get("checkpoints")]
            if not results:
                continue
            curves[(key, setting)], finals = results, [x["checkpoints"][-1] for x in results]
            mean = {loss: float(np.mean([f[loss] for f in finals])) for loss in DIAGNOSTIC_LOSSES}
            own_gain = [f["after_own_context"] - f["alone"] for f in finals]
            uses = all(g < -0.05 for g in own_gain) and mean["after_mismatched_context"] > mean["after_own_context"]
            section.setdefault(key, []).append(
                {"setting": setting, "seeds": len(finals), "final_step": finals[0]["step"], **mean,
                 "own_minus_alone_per_seed": own_gain, "uses_own_side": uses,
                 "mismatched_minus_alone": mean["after_mismatched_context"] - mean["alone"]})  # fmt: skip
            rows.append([key, setting.replace("_", " "), len(finals), finals[0]["step"], *map(_f, mean.values()),
                         ", ".join(f"{g:+.3f}" for g in own_gain), "**yes**" if uses else "no"])  # fmt: skip
    if not rows:
        doc.append("No bridge diagnostic outputs found.")
        return section
    header = ["run group", "CPT setting", "seeds", "step", "loss alone", "after own side", "after another pair's side",
              "own − alone (per seed)", "reads its own side"]  # fmt: skip
    caption = "Bridge diagnostic during CPT (mean over seeds): loss in three contexts"
    doc += [table(header, rows), image(_plot_diagnostic(curves, figures), caption)]
    return section


def _plot_diagnostic(curves: dict, figures: Path) -> str:
    from matplotlib.lines import Line2D

    keys = sorted({k for k, _ in curves}, key=lambda k: (k.split("/")[1] != "native", k))  # the control first
    fig, axes = _figure(1, len(keys), 5.2, 3.6)
    for ax, key in zip(axes[0], keys):
        for setting, style in SETTING_STYLES.items():
            results = curves.get((key, setting)) or []
            steps = [e["step"] for e in results[0]["checkpoints"]] if results else []
            for loss, color in DIAGNOSTIC_LOSSES.items() if results else ():
                values = np.mean([[e[loss] for e in x["checkpoints"][: len(steps)]] for x in results], axis=0)
                ax.plot(steps, values, style, color=color, marker="o", markersize=2.5)
        ax.set(title=key, xlabel="CPT step", ylabel="loss of the second side (nats/token)")
    handles = [Line2D([], [], color=color, label=loss.replace("_", " ")) for loss, color in DIAGNOSTIC_LOSSES.items()]
    handles += [Line2D([], [], color="black", linestyle=style, label=f"trained: {setting.replace('_', ' ')}")
                for setting, style in SETTING_STYLES.items() if any(s == setting for _, s in curves)]  # fmt: skip
    fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return _save(fig, figures, "bridge_diagnostic.png")


def _report_density(doc: list[str], plan: Plan, truth: dict | None) -> dict:
    """Per group: measured occurrences and density per question file and corpus (against the planted counts in a
    synthetic world), and the slope of the per-item gap on log occurrences."""
    doc += ["## Cultural density: measured vs planted",
            "Occurrences and density as `run_density.py` measures them (docs/density.md)"
            + (", against the planted counts of `world/truth.json`." if truth else ".")]  # fmt: skip
    section = {}
    for key, group in plan.groups.items():
        result = _read_json(Path(group["density"]) / "density.json")
        if not result:
            if set(SETTINGS) <= set(group["settings"]):  # a group of one setting has no density step
                doc.append(f"{key}: no density output at `{group['density']}/density.json`.")
            continue
        entries = [_density_entry(row, result, truth, group["lang"]) for row in result["table"]]
        header = ["questions", "corpus", "documents", "measured occurrences", "measured density", "planted occurrences",
                  "planted density", "questions exact", "mean |error| per question"]  # fmt: skip
        rows = [[e["questions"], e["corpus"], f"{e['documents']:,}", e["occurrences"], _f(e["density"], ".3e"),
                 *([e["planted_occurrences"], _f(e["planted_density"], ".3e"),
                    f"{e['questions_exact']}/{e['questions_planted']}", _f(e["mean_abs_error"], ".2f")]
                   if "planted_occurrences" in e else ["–"] * 4)] for e in entries]  # fmt: skip
        doc += [f"### {key}", table(header, rows)]
        analysis = (result.get("instance_analysis") or {}).get("results") or []
        slopes = [_slope_entry(r) for r in analysis]
        if analysis:
            header = ["questions", "source corpus", "items", "transferred", "mean occ. transferred", "mean occ. all",
                      "gap slope on log(1 + occ.) [95% CI]", "items in fit", "reading"]  # fmt: skip
            rows = [[r["questions"], r["source_corpus"], r["items"], r["transferred"],
                     _f(r["mean_occurrences_transferred"], ".2f"), _f(r["mean_occurrences_all"], ".2f"),
                     run_transfer.gap_text(s, "slope") if s["slope"] is not None else "–", s["n_items"], s["reading"]]
                    for r, s in zip(analysis, slopes)]  # fmt: skip
            doc += ["Instance-level analysis (first seed, final checkpoint; docs/density.md), 95% bootstrap interval "
                    f"over items. The slope is the {slopes[0]['meaning']}.", table(header, rows)]  # fmt: skip
        section[key] = {"density_json": str(Path(group["density"]) / "density.json"), "rows": entries,
                        "instance_analysis": analysis or None, "gap_slopes": slopes}  # fmt: skip
    return section


def _density_entry(row: dict, result: dict, truth: dict | None, lang: str) -> dict:
    """A row of density.json's table; in a synthetic world, where the questions' language is the corpus's, with the
    planted counts (truth.json) and how many questions were measured exactly (up to --top_k)."""
    entry = {k: row[k] for k in ("questions", "corpus", "documents", "occurrences", "density")}
    if not truth or question_lang_from_stem(row["questions"]) != row["corpus"]:
        return entry
    planted = [r["counts"][row["corpus"]] for r in truth["questions"][lang]]
    got = {e["index"]: e["occurrences"] for e in result["questions"]
           if (e["questions"], e["corpus"]) == (row["questions"], row["corpus"])}  # fmt: skip
    top_k = result["setting"]["top_k"]
    return entry | {"planted_occurrences": sum(planted), "planted_density": sum(planted) / row["documents"],
                    "questions_exact": sum(got.get(i) == min(c, top_k) for i, c in enumerate(planted)),
                    "questions_planted": len(planted),
                    "mean_abs_error": float(np.mean([abs(got.get(i, 0) - c)
                                                     for i, c in enumerate(planted)]))}  # fmt: skip


#: The slope's interval against 0 (run_transfer.verdict's rule), in words.
SLOPE_READINGS = {
    "transfer": ("above 0", "facts the source corpus states more often gained more from bridges"),
    "reverse": ("below 0", "facts the source corpus states more often gained less from bridges"),
    "no evidence": ("includes 0", "no evidence that the gap grows with how often the source states a fact"),
    "undetermined": ("undetermined", "the slope lies outside its own interval (too few resamples): no conclusion"),
}


def _slope_entry(result: dict) -> dict:
    """The gap-vs-occurrences slope of one analysed question file, with its interval against 0 in words."""
    fit = result["gap_vs_log_occurrences"]
    entry = {"questions": result["questions"], "source_corpus": result["source_corpus"], "slope": fit["slope"],
             "slope_ci": fit["slope_ci"], "n_items": fit["n_items"], "meaning": fit["meaning"]}  # fmt: skip
    if fit["slope"] is None:
        return entry | {"verdict": None, "reading": f"no slope: {fit.get('reason', 'not computed')}"}
    interval, reading = SLOPE_READINGS[run_transfer.verdict(tuple(fit["slope_ci"]), fit["slope"])]
    return entry | {"verdict": interval, "reading": f"{interval}: {reading}"}


def _report_packing(doc: list[str], plan: Plan) -> dict | None:
    """Each run's packing audit (run_cpt.py): co-location, hashes of its tokens and documents, what it could not
    check; and whether the settings of every seed differ only in co-location."""
    doc += ["## Packing audits: the settings differ only in co-location",
            "Each CPT run's `packing_audit.json` (docs/cpt.md): with bridges 100% of pairs co-located, otherwise 0%, "
            "and equal hashes across the settings of a seed."]  # fmt: skip
    entries, hashes = [], {}
    for run in plan.runs:
        audit = _read_json(Path(run.dir) / "packing_audit.json")
        if audit:
            pairs, digests = audit.get("pairs", {}), audit.get("hashes", {})
            digest = (digests.get("tokens_multiset_sha256"), digests.get("documents_seen_sha256"))
            hashes.setdefault((run.lang, run.variant, run.seed), []).append(digest)
            entries.append({"run": run.name, "setting": run.setting,
                            **{f"pairs_{k}": pairs.get(k) for k in ("total", "co_located", "split")},
                            "co_located_percent": pairs.get("co_located_percent"),
                            "tokens_multiset_sha256": digest[0], "documents_seen_sha256": digest[1],
                            **{k: audit.get(k) for k in ("real_token_fraction", "windows", "guarantees_hold")},
                            "unchecked": audit.get("unchecked") or []})  # fmt: skip
    if not entries:
        doc.append("No packing audits found.")
        return None
    header = ["run", "pairs", "co-located", "co-located %", "token multiset hash", "documents-seen hash",
              "real-token fraction", "windows", "audit: guarantees hold"]  # fmt: skip
    rows = [[e["run"], e["pairs_total"], e["pairs_co_located"], _f(e["co_located_percent"], ".0f"),
             str(e["tokens_multiset_sha256"])[:12], str(e["documents_seen_sha256"])[:12],
             _f(e["real_token_fraction"], ".3f"), e["windows"], e["guarantees_hold"]] for e in entries]  # fmt: skip
    colocation_ok = all(e["co_located_percent"] == (100.0 if e["setting"] == "bridges" else 0.0) for e in entries)
    seeds = [digests for digests in hashes.values() if len(digests) > 1]  # the settings of a seed
    equal_hashes = bool(seeds) and all(len(set(v)) == 1 and None not in v[0] for v in seeds)
    guarantees_hold = all(e["guarantees_hold"] is True for e in entries)
    unchecked = {e["run"]: e["unchecked"] for e in entries if e["unchecked"]}
    doc += [table(header, rows), bullets([
        "Co-location: " + ("every with-bridges run 100%, every other run 0%." if colocation_ok
                           else "**NOT as required** (see the table): the comparison is not valid."),
        "Same tokens and documents in every setting of a seed: " + (
            "equal hashes." if equal_hashes else "**hashes differ or are missing** for some seed."),
        "Every run's audit: " + ("all guarantees checked and holding." if guarantees_hold
                                 else "**guarantees not all shown to hold** (`guarantees_hold` false or absent)."),
        *(f"**{run}: unchecked**, so not shown to hold: {'; '.join(what)}." for run, what in unchecked.items()),
    ])]  # fmt: skip
    return {"runs": entries, "colocation_ok": colocation_ok, "equal_hashes": equal_hashes,
            "guarantees_hold": guarantees_hold, "unchecked": unchecked}  # fmt: skip


# --------------------------------------------------------------------------------------
# On its own: the report of a study folder
# --------------------------------------------------------------------------------------


def read_plan(out: Path) -> SimpleNamespace:
    """The plan of the study (or sweep) in ``out``, read back from the plan.json run_study.py wrote there, with the
    fields the report reads; its paths as the study ran them (relative to the repository root, where steps run)."""
    path = out / "plan.json"
    if not path.is_file():
        raise InputError(f"{path} not found: {out} is not the output folder of a run_study.py run.")
    record = json.loads(path.read_text(encoding="utf-8"))
    if (REPO_DIR / record["out"]).resolve() != (REPO_DIR / out).resolve():
        raise InputError(f"{path} is the plan of a study in {record['out']}, and its paths point there, not to {out}.")
    return _plan_from_record(record)


def _plan_from_record(record: dict) -> SimpleNamespace:
    return SimpleNamespace(
        preset=SimpleNamespace(**record["preset"]), out=record["out"], groups=record["groups"], dirs=record["dirs"],
        steps=[SimpleNamespace(**step) for step in record["steps"]],
        runs=[SimpleNamespace(**run) for run in record["runs"]], config=record["configuration"],
        state_dir=record["state_dir"],
        cells={name: _plan_from_record(cell) for name, cell in record.get("cells", {}).items()},
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study_dir", help="The output folder of a run_study.py run (it holds plan.json).")
    args = parser.parse_args(argv)
    # 1. The plan, read back from the study folder; paths in it are relative to the repository root.
    out = Path(args.study_dir).resolve()
    os.chdir(REPO_DIR)
    plan = read_plan(out.relative_to(REPO_DIR) if out.is_relative_to(REPO_DIR) else out)
    # 2. The report (a sweep's: each cell's and the sweep's), from the files the steps wrote.
    paths = write_reports(plan)
    if paths["unfinished"]:
        print(f"The study is NOT finished: {len(paths['unfinished'])} of {paths['steps']} steps did not finish.")
    print(f"Report: {paths['md']} and {paths['html']}")
    return 0


if __name__ == "__main__":
    exit_on_input_error(main)
