#!/usr/bin/env python
# /// script
# requires-python = ">=3.10"
# dependencies = [
#   "transformers>=5.0", "numpy>=2.0", "scipy>=1.11", "matplotlib>=3.8", "markdown-it-py", "regex", "tqdm", "pyyaml",
#   "psutil",
# ]
# ///
"""The report of a study: report.md, report.html and report.json from the files its steps wrote (docs/study.md).

Sections: the run (machine, load, step times); the synthetic world and the model; questions (answer positions,
ties, both tie rules); transfer with minus without bridges per direction, the gap per tier of facts (knowledge or
skill) and mismatched bridges; the manipulation checks; anchors vs control; the bridge diagnostic per CPT setting;
cultural density (measured vs planted, the gap against occurrences); the packing audits. Every number comes from a
file a step wrote (report.json collects them, with the paths); every sentence of conclusion is written from those
numbers, never stronger than their intervals; what a section measures is explained in docs/*.md, which the report
links. A sweep's report is sweep_report.py. run_study.py writes the report after its last step; on its own it
reports a study folder from the plan.json run_study.py wrote there::

    python study_report.py study_runs/cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import itertools
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np

from cloze import question_lang_from_stem, question_stem, read_predictions
from run_transfer import (
    MISMATCHED_WORDS,
    UNDETERMINED_TEXT,
    analyse_direction,
    direction_words,
    knowledge_sentence,
    mismatched_sentence,
    read_run,
    transfer_directions,
    transfer_markdown,
    verdict,
    verdict_cell,
)
from study_common import InputError, exit_on_input_error, write_json_atomic, write_text_atomic
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
# A report as blocks, and the words and numbers every section shares
# --------------------------------------------------------------------------------------


class ReportDoc:
    """A report as Markdown blocks; its HTML page is that Markdown rendered (markdown-it-py, raw HTML escaped)."""

    def __init__(self):
        self.blocks: list[str] = []

    def h(self, level: int, text: str) -> None:
        self.blocks.append("#" * level + " " + text)

    def p(self, text: str) -> None:
        self.blocks.append(text)

    def bullets(self, items: list[str]) -> None:
        if items:
            self.blocks.append("\n".join(f"- {item}" for item in items))

    def table(self, headers: list[str], rows: list[list]) -> None:
        cells = [[str(c).replace("|", "\\|") for c in row] for row in [headers, *rows]]
        lines = ["| " + " | ".join(row) + " |" for row in cells]
        self.blocks.append("\n".join([lines[0], "|" + "---|" * len(headers), *lines[1:]]))

    def img(self, path: str, caption: str) -> None:
        self.blocks.append(f"![{caption}]({path})\n\n*{caption}*")

    def markdown(self) -> str:
        return "\n\n".join(self.blocks) + "\n"

    def html(self, title: str) -> str:
        from markdown_it import MarkdownIt

        body = MarkdownIt("commonmark", {"html": False}).enable("table").render(self.markdown())
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
                f"<style>{REPORT_CSS}</style></head><body>\n{body}</body></html>\n")  # fmt: skip


REPORT_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
    "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px;"
    "text-align:left}th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}code{background:#f5f5f5;"
    "padding:0 3px}"
)


def _f(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def _ci(ci) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def _gap(stats: dict, key: str = "mean_gap") -> str:
    """An estimate with its interval, as tables show it: +0.080 [+0.050, +0.111]."""
    return f"{stats[key]:+.3f} {_ci(stats[key + '_ci'])}"


def _read_json(path) -> dict | None:
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _note_undetermined(doc: ReportDoc, verdicts: list[str]) -> None:
    if "undetermined" in verdicts:
        doc.p(UNDETERMINED_TEXT)


def _group_runs(plan: Plan, key: str, setting: str | None = None) -> list[Run]:
    """The runs of a run group ("<lang>/<variant>"), of one setting if given."""
    return [r for r in plan.runs if f"{r.lang}/{r.variant}" == key and setting in (None, r.setting)]


def _models(plan: Plan, key: str, group: dict, final: str = "") -> list[tuple[str, str, list[str]]]:
    """(label, name, probing folders) of the base model and of each CPT setting of a group."""
    settings = [(f"CPT {s.replace('_', ' ')}{final}", s, [r.eval_dir for r in _group_runs(plan, key, s)])
                for s in group["settings"]]  # fmt: skip
    return [("base model", "base", [group["base_eval"]]), *settings]


def _all_probed(runs: list[Run]) -> bool:
    return all((Path(r.eval_dir) / "accuracy.json").is_file() for r in runs)


def _tier_indices(truth: dict, lang: str) -> dict[str, list[int]]:
    tiers: dict[str, list[int]] = {}
    for record in truth["questions"][lang]:
        tiers.setdefault(record["tier"], []).append(record["index"])
    return tiers


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, figures: Path, name: str) -> str:
    """Save a PNG through a temporary name and a rename, like every other output."""
    tmp = figures / f".{name}.tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, figures / name)
    _pyplot().close(fig)
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
                    "status": _status(plan, unfinished), "sections": {}}  # fmt: skip
    doc = ReportDoc()
    doc.h(1, f"Cross-lingual culture transfer study: preset `{preset.name}`")
    doc.p(f"Configuration: {configuration_text(plan.config)}. Every effective value is in `plan.json` and "
          "`report.json`.")  # fmt: skip
    _unfinished_banner(doc, plan, unfinished)
    doc.p(f"Generated {record['generated']}. {preset.description} Every number below is read from a file a step "
          "wrote (`report.json` collects them, with the paths); `commands.sh` holds every command of the study and "
          "`logs/<step>.log` its output.")  # fmt: skip
    record["machine"] = _report_machine(doc, plan)
    world = plan.dirs.get("world")
    truth = _read_json(Path(world) / "truth.json") if preset.synthetic and world else None
    sections = record["sections"]
    if truth:
        sections["world"] = _report_world(doc, plan, truth)
    sections["questions"] = _report_questions(doc, plan)
    sections["transfer"] = _report_transfer(doc, plan, truth, figures)
    sections["manipulation_checks"] = _report_manipulation_checks(doc, plan)
    if truth and {"native", "anchors"} <= {g["variant"] for g in plan.groups.values()}:
        sections["anchors"] = _report_anchors(doc, plan, truth, figures)
    sections["diagnostic"] = _report_diagnostic(doc, plan, figures)
    sections["density"] = _report_density(doc, plan, truth)
    sections["packing"] = _report_packing(doc, plan)
    record["sections"] = {name: section for name, section in sections.items() if section}
    md, page = out / "report.md", out / "report.html"
    write_text_atomic(md, doc.markdown())
    write_text_atomic(page, doc.html(f"Study report ({preset.name})"))
    write_json_atomic(out / "report.json", record)
    return {"md": md, "html": page, "json": out / "report.json", "steps": len(plan.steps), "unfinished": unfinished}


def _status(plan: Plan, unfinished: dict[str, str]) -> dict:
    return {"complete": not unfinished, "steps": len(plan.steps), "finished": len(plan.steps) - len(unfinished),
            "unfinished": [{"step": step_id, "why": why} for step_id, why in unfinished.items()]}  # fmt: skip


def _unfinished_banner(doc: ReportDoc, plan: Plan, unfinished: dict[str, str]) -> None:
    if unfinished:
        doc.p(
            f"**UNFINISHED: {len(unfinished)} of {len(plan.steps)} steps of this study have no finished run.** What "
            "follows is what the finished steps wrote, and no conclusion covers what is missing. Run the study's "
            "command again to finish it. The steps that did not finish:"
        )
        doc.bullets([f"`{step_id}`: {why}" for step_id, why in unfinished.items()])


def _report_machine(doc: ReportDoc, plan: Plan) -> dict:
    """The machine, the wall time of the last invocation that ran steps, its load, and the seconds per step kind."""
    import platform

    import torch

    state = Path(plan.state_dir or plan.out)
    timings, run = read_step_seconds(state), _read_json(state / "timings.json") or {}
    samples, jobs = run.get("load_average_samples") or [], run.get("jobs")
    load = {"mean": float(np.mean(samples)), "min": min(samples), "max": max(samples)} if samples else None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    total = sum(timings.get(s.id, 0.0) for s in plan.steps)
    doc.h(2, "Run")
    text = f"Machine: {os.cpu_count()} CPU cores, device {device}, {platform.platform()}."
    if run.get("wall_s_this_invocation") is not None:
        text += (f" The last invocation that ran steps took {fmt_time(run['wall_s_this_invocation'])} (wall), {jobs} "
                 f"steps at a time; the steps took {fmt_time(total)} in all.")  # fmt: skip
    if load:
        text += (f" 1-minute load average meanwhile: mean {load['mean']:.1f} (min {load['min']:.1f}, max "
                 f"{load['max']:.1f}), the study's own {jobs} jobs included.")  # fmt: skip
    doc.p(text)
    by_kind: dict[str, list[float]] = {}
    for step in (s for s in plan.steps if s.id in timings):
        by_kind.setdefault(step.kind, []).append(timings[step.id])
    rows = [[kind, len(v), f"{sum(v):.0f}", f"{max(v):.0f}"] for kind, v in by_kind.items()]
    doc.table(["step kind", "steps", "seconds (sum)", "seconds (longest)"], rows)
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "device": device,
            "steps_wall_s": run.get("wall_s_this_invocation"), "jobs": jobs, "load_average": load,
            "step_seconds_total": total, "step_seconds": {s.id: timings.get(s.id) for s in plan.steps}}  # fmt: skip


#: What each tier of facts leaves out of a corpus (synthetic_world.TIERS; docs/decomposition.md).
TIER_WORDS = {
    "absent": "Facts of the **absent** tier are stated in the target corpus as often as high facts and never in "
    "English.",
    "en_only": "Facts of the **en_only** tier are stated in English as often as high facts and never in the target "
    "corpus.",
}


def _report_world(doc: ReportDoc, plan: Plan, truth: dict) -> dict:
    """The tiers of facts with their planted counts and densities, and the model and its training budgets."""
    base, world = Path(plan.dirs["base"]), _read_json(Path(plan.dirs["world"]) / "world.json") or {}
    stats, config = _read_json(base / "data_stats.json") or {}, _read_json(base / "config.json") or {}
    present = {tier for tiers in truth["densities"].values() for tier in tiers}
    doc.h(2, "The synthetic world and the model")
    doc.p(
        "A generated world with planted ground truth (`synthetic_world.py`). Facts of the **high** tier are frequent "
        "in both corpora; facts of the **low** tier as frequent in the target corpus and "
        f"{world.get('arguments', {}).get('low_resource_ratio', '?')}x rarer in English. "
        + "".join(f"{words} " for tier, words in TIER_WORDS.items() if tier in present)
        + "Chance is 0.25 whatever the frequencies (a question's four options have identical planted counts)."
    )
    rows = [[lang, tier, d["facts"], d["en_statements"], d["tgt_statements"], _f(d["en_density"], ".2e"),
             _f(d["tgt_density"], ".2e"), "∞" if d["tgt_over_en"] is None else _f(d["tgt_over_en"], ".1f")]
            for lang, tiers in truth["densities"].items() for tier, d in tiers.items() if tier != "all"]  # fmt: skip
    doc.table(["language", "tier", "facts", "English statements", "target statements", "English density",
               "target density", "target / English"], rows)  # fmt: skip
    params, pre, cpt = stats.get("parameters"), plan.preset.pretrain, plan.preset.cpt  # run_pretrain.py counts them
    tokens = stats.get("tokens")
    corpus = f"{world.get('en_corpus', {}).get('documents', '?')} documents" + (
        f", {tokens:,} tokens" if isinstance(tokens, int) else ""
    )
    size = f"{params / 1e6:.2f}M parameters" if params else "size unknown"
    doc.p(
        f"Base model: Qwen2 architecture, hidden {config.get('hidden_size', '?')}, "
        f"{config.get('num_hidden_layers', '?')} layers, vocabulary {config.get('vocab_size', '?')} ({size}), "
        f"pretrained on the English corpus ({corpus}) for {pre.get('max_steps')} steps of "
        f"{pre.get('per_device_train_batch_size')} x {pre.get('block_size')} tokens. Continual pretraining: "
        f"{cpt.get('max_steps')} steps of {cpt.get('per_device_train_batch_size')} x {cpt.get('block_size')} tokens "
        f"per run, a checkpoint every {cpt.get('save_steps')} steps, seeds "
        f"{', '.join(map(str, sorted({r.seed for r in plan.runs})))}, English replay "
        f"{plan.preset.build.get('replay_ratio', 0):.0%} of the CPT tokens."
    )
    return {"densities": truth["densities"], "base_params": params, "base_data_stats": stats}


#: Ties above this share of a file's items are flagged (run_eval.py warns at the same rate).
TIE_FLAG_RATE = 0.05


def _final_accuracy(eval_dir: str) -> tuple[dict, dict] | None:
    """(accuracy.json, its last checkpoint's entry) of a probing output, or None."""
    accuracy = _read_json(Path(eval_dir) / "accuracy.json")
    return (accuracy, accuracy["checkpoints"][-1]) if accuracy and accuracy.get("checkpoints") else None


def _report_questions(doc: ReportDoc, plan: Plan) -> dict:
    """Per question file: where the answers sit and what always answering option 0 scores; per model the tie rate
    and the accuracy under both tie rules at the final checkpoint (run_eval.py's accuracy.json)."""
    doc.h(2, "Questions: answer positions, ties and the two tie rules")
    doc.p(
        "Tie rules **first** (the paper's) and **fractional**: docs/probing.md (ties and position bias). At the final "
        "checkpoint; CPT settings are the mean over seeds."
    )
    section = {}
    for key, group in plan.groups.items():
        models = _models(plan, key, group)
        finals = {name: [f for f in map(_final_accuracy, dirs) if f] for _, name, dirs in models}
        described = next((a["questions"] for found in finals.values() for a, _ in found), None)
        if not described:
            doc.p(f"{key}: no probing output found.")
            continue
        doc.h(3, key if plan.preset.synthetic else group["lang"])
        stems = [Path(q).stem for q in group["questions"] if Path(q).stem in described]
        files = {s: {"items": described[s].get("items"), "chance_accuracy": described[s].get("chance_accuracy"),
                     **(described[s].get("position_bias") or {})} for s in stems}  # fmt: skip
        shares = {s: ", ".join(f"{k}: {v:.2f}" for k, v in f.get("answer_position_share", {}).items())
                  for s, f in files.items()}  # fmt: skip
        doc.table(["questions", "items", "share of answers at option position", "always option 0: acc.", "chance acc."],
                  [[s, f["items"], shares[s], _f(f.get("always_first_accuracy")), _f(f["chance_accuracy"])]
                   for s, f in files.items()])  # fmt: skip
        entries, labels = [], {name: label for label, name, _ in models}
        for name, stem in itertools.product(labels, stems):
            per_seed = [entry["accuracy"][stem] for _, entry in finals[name] if stem in entry["accuracy"]]
            if per_seed:
                mean = {k: float(np.mean([a[k] for a in per_seed]))
                        for k in ("tie_rate", "accuracy", "accuracy_fractional", "ties_advantage")}  # fmt: skip
                entries.append({"model": name, "questions": stem, "seeds": len(per_seed),
                                "final_steps": sorted({entry["step"] for _, entry in finals[name]}),
                                "ties": [a["ties"] for a in per_seed], "tie_rate": mean["tie_rate"],
                                "accuracy_first": mean["accuracy"], "accuracy_fractional": mean["accuracy_fractional"],
                                "ties_advantage": mean["ties_advantage"]})  # fmt: skip
        doc.table(["model", "questions", "seeds", "final step", "tie rate", "acc. (first rule)",
                   "acc. (fractional rule)", "first − fractional"],
                  [[labels[e["model"]], e["questions"], e["seeds"], ", ".join(map(str, e["final_steps"])),
                    _f(e["tie_rate"]), _f(e["accuracy_first"]), _f(e["accuracy_fractional"]),
                    f"{e['ties_advantage']:+.3f}"] for e in entries])  # fmt: skip
        flagged = [f"{labels[e['model']]}, {e['questions']}: {e['tie_rate']:.1%} of items tie for the best score "
                   f"(above {TIE_FLAG_RATE:.0%}): read the fractional rule."
                   for e in entries if e["tie_rate"] > TIE_FLAG_RATE]  # fmt: skip
        doc.bullets(flagged or [f"Ties stay at or below {TIE_FLAG_RATE:.0%} of the items for every model and file."])
        section[key] = {"files": files, "final": entries, "tie_flags": flagged}
    return section


def _report_transfer(doc: ReportDoc, plan: Plan, truth: dict | None, figures: Path) -> dict:
    """Per run group trained in both settings: run_transfer.py's figures and its transfer.md (the one rendering of
    transfer.json), and report.json's entries read from transfer.json."""
    doc.h(2, "Transfer: with minus without bridges (the paper's measurement)")
    doc.p("Each group's tables are its `transfer.md` (`run_transfer.py`).")
    section = {}
    for key, group in plan.groups.items():
        lang, variant = group["lang"], group["variant"]
        title = f"{lang}, {VARIANT_TITLES.get(variant, variant)}" if plan.preset.synthetic else lang
        if not set(SETTINGS) <= set(group["settings"]):
            continue  # a group trained in one setting serves the anchors comparison only
        doc.h(3, title)
        result = _read_json(Path(group["transfer"]) / "transfer.json")
        if not result:
            doc.p(f"No transfer analysis at `{group['transfer']}/transfer.json` (the step did not finish).")
            continue
        for name, caption in (("transfer_curves", "accuracy during CPT with (blue) and without (orange) bridges"),
                              ("transfer_summary", "mean gap over the curve per direction")):  # fmt: skip
            source = Path(group["transfer"]) / f"{name}.png"
            if source.is_file():
                shutil.copyfile(source, figures / f"{lang}-{variant}-{name}.png")
                doc.img(f"figures/{lang}-{variant}-{name}.png", f"{title}: {caption}")
        doc.p(transfer_markdown(result, level=4, standalone=False))
        section[key] = {"transfer_json": str(Path(group["transfer"]) / "transfer.json"),
                        **_transfer_record(result, group)}  # fmt: skip
    return section


#: What the report keeps of a gap (run_transfer.analyse_direction's fields).
GAP_FIELDS = ("mean_gap", "mean_gap_ci", "final_gap", "final_gap_ci", "verdict")
#: What the report keeps of a direction's knowledge_transfer (run_transfer.py's fields).
KNOWLEDGE_FIELDS = ("often_tier", "never_tier", "mean_did", "mean_did_ci", "final_did", "final_did_ci", "verdict",
                    "skill_mean_gap", "skill_mean_gap_ci", "skill_verdict", "meaning")  # fmt: skip


def _transfer_record(result: dict, group: dict) -> dict:
    """report.json's entries of a group's transfer.json: its directions, the gap per tier, knowledge and mismatched
    bridges with run_transfer's sentences."""
    base = _final_accuracy(group["base_eval"])
    base = {stem: v["accuracy"] for stem, v in base[1]["accuracy"].items()} if base else {}
    found = transfer_directions(result)
    directions = [{"direction": d["direction"], "questions": d["questions"], "base_accuracy": base.get(d["questions"]),
                   "final_step": language["steps"][-1], "accuracy_with_final": d["accuracy_with"][-1],
                   "accuracy_without_final": d["accuracy_without"][-1],
                   **{f: d[f] for f in ("final_gap", "final_gap_ci", "mean_gap", "mean_gap_ci")},
                   "per_seed_mean_gaps": [s["mean_gap"] for s in d["per_seed"]],
                   "mcnemar_p_final": [m["p_value"] for m in d["mcnemar_final"]], "verdict": d["verdict"],
                   "tie_policy": result["tie_policy"], "tie_policies": d["tie_policies"],
                   "tie_policies_differ": d["tie_policies_differ"]} for language, d in found]  # fmt: skip
    record = {"directions": directions}
    if any(d.get("tiers") for _, d in found):
        record["tiers"] = [{"direction": d["direction"], "tier": tier, "questions": s["n_questions"],
                            **{f: s[f] for f in GAP_FIELDS}}
                           for _, d in found for tier, s in (d.get("tiers") or {}).items()]  # fmt: skip
        record["knowledge"] = [{"direction": d["direction"],
                                **{f: d["knowledge_transfer"][f] for f in KNOWLEDGE_FIELDS},
                                "sentence": knowledge_sentence(language["lang"], d)}
                               for language, d in found if d.get("knowledge_transfer")]  # fmt: skip
    if any(d.get("mismatched_minus_none") for _, d in found):
        record["mismatched"] = [{"direction": d["direction"], **{key: {f: d[key][f] for f in GAP_FIELDS}
                                                                 for key in MISMATCHED_WORDS},
                                 "sentence": mismatched_sentence(language["lang"], d)}
                                for language, d in found if d.get("mismatched_minus_none")]  # fmt: skip
    return record


#: The tiers of facts (synthetic_world.TIERS) in a figure title's few words.
TIER_SHORT = {"high": "frequent in English", "low": "rare in English", "absent": "never in English",
              "en_only": "never in the target corpus"}  # fmt: skip


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


def _report_manipulation_checks(doc: ReportDoc, plan: Plan) -> dict:
    """Per run group: the four checks at the base model and at the final checkpoint per CPT setting (mean over
    seeds, exact binomial interval), whether each is at chance, and what that means for reading the gap."""
    section = {}
    for key, group in plan.groups.items():
        models = _models(plan, key, group, final=" (final)")
        finals = {name: [f for f in (_final_checks(d, group["lang"]) for d in dirs) if f] for _, name, dirs in models}
        if not any(finals.values()):
            continue
        if not section:
            doc.h(2, "Manipulation checks: what the gap can be read as")
            doc.p(
                "At the base model and at the final checkpoint of each CPT setting, mean over seeds "
                f"(docs/decomposition.md). Intervals: exact binomial {CHECK_CONFIDENCE:.0%} over the items of a check; "
                "**at chance** when the interval covers chance."
            )
        doc.h(3, key if plan.preset.synthetic else group["lang"])
        labels, results = {name: label for label, name, _ in models}, {}
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
        ordered = sorted(results, key=lambda cw: CHECKS.index(cw[0]))  # stable: as the files order them
        entries = [e for check_what in ordered for e in results[check_what].values()]
        doc.table(["check", "direction / questions", "model", "seeds", "step", f"accuracy [{CHECK_CONFIDENCE:.0%} CI]",
                   "items", "per seed", "chance", "vs chance"],
                  [[e["check"], e["what"], labels[e["model"]], e["seeds"], ", ".join(map(str, e["steps"])),
                    f"{e['accuracy']:.3f} [{e['ci'][0]:.3f}, {e['ci'][1]:.3f}]", e["n"],
                    ", ".join(f"{a:.3f}" for a in e["per_seed"]), _f(e["chance"]),
                    f"**{e['relation']}**" if e["relation"] == "at chance" else e["relation"]]
                   for e in entries])  # fmt: skip
        sentences = [s for cw in ordered if (s := _check_sentence(*cw, results[cw], labels, group["lang"]))]
        doc.bullets(sentences)
        files = [str(Path(d) / "manipulation_checks.json") for _, _, dirs in models for d in dirs]
        section[key] = {"files": [f for f in files if Path(f).is_file()], "confidence": CHECK_CONFIDENCE,
                        "checks": entries, "sentences": sentences}  # fmt: skip
    return section


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


def _report_anchors(doc: ReportDoc, plan: Plan, truth: dict, figures: Path) -> dict:
    """Anchors − control per direction and tier of facts: accuracy with shared Latin names minus with native-script
    names, pooled over the settings both variants ran and per setting."""
    doc.h(2, "Anchors vs control: shared entity names and the frequency asymmetry")
    doc.p(
        "Difference = accuracy with English's Latin names in the target language (anchors) − with its own script "
        "(control), per tier, pooled over the CPT settings both variants ran and per setting."
    )
    section = {}
    for lang in sorted({g["lang"] for g in plan.groups.values()}):
        native, anchors = _group_runs(plan, f"{lang}/native"), _group_runs(plan, f"{lang}/anchors")
        if not (native and anchors and _all_probed(native + anchors)):
            doc.p(f"{lang}: probing results of both variants are missing; nothing to compare.")
            continue
        entries, curves, steps = _anchor_differences(lang, native, anchors, truth)
        doc.h(3, f"{lang}: anchors − control")
        shared = sorted({e["setting"] for e in entries if e["setting"] != "pooled"})
        which = " and ".join(s.replace("_", " ") for s in shared)
        caption = f"{lang}: accuracy during CPT with shared Latin names (anchors) and native-script names (control)"
        doc.img(
            _plot_anchors(lang, steps, curves, plan, truth, figures),
            f"{caption}, mean over seeds ({which}); step 0 is the base model",
        )
        doc.table(["direction", "tier", "CPT setting", "questions", "run pairs", "mean acc. anchors",
                   "mean acc. control", "difference [95% CI]", "verdict"],
                  [[direction_words(e["direction"], lang), e["tier"], e["setting"].replace("_", " "), e["questions"],
                    e["run_pairs"], _f(e["accuracy_anchors"]), _f(e["accuracy_control"]), _gap(e, "difference"),
                    verdict_cell(e["verdict"])] for e in entries])  # fmt: skip
        _note_undetermined(doc, [e["verdict"] for e in entries])
        primary = "pooled" if len(shared) > 1 else shared[0]
        conclusions = _asymmetry(lang, {(e["direction"], e["tier"]): e for e in entries
                                                 if e["setting"] == primary})  # fmt: skip
        doc.bullets(conclusions)
        section[lang] = {"steps": steps, "comparisons": entries, "conclusions": conclusions}
    return section


def _anchor_differences(lang: str, native: list[Run], anchors: list[Run], truth: dict) -> tuple[list, dict, list]:
    """Anchors − control per direction, tier and setting (pooled first where both ran both settings), the curves of
    the first for the figure, and the steps both variants share."""
    results = {(r.variant, r.setting, r.seed): read_run(r.eval_dir, r.setting) for r in native + anchors}
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
            stats = analyse_direction(a, n, 1000, 0, 0.95)
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


def _plot_anchors(lang, steps, curves, plan, truth, figures) -> str:
    """Accuracy of both variants during CPT per question language (rows) and tier (columns), from the base model."""
    plt, base, tiers = _pyplot(), {}, _tier_indices(truth, lang)
    for variant in ("anchors", "native"):
        group = plan.groups.get(f"{lang}/{variant}")
        if group and (Path(group["base_eval"]) / "accuracy.json").is_file():
            by_stem = read_predictions(group["base_eval"])[1]
            base[variant] = {stem: next(iter(v.values())) for stem, v in by_stem.items() if v}
    fig, axes = plt.subplots(2, len(tiers), figsize=(5 * len(tiers), 6.4), squeeze=False, sharey=True)
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
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8, loc="best")
    fig.suptitle(f"{lang}: shared names vs native names (dotted: chance)", fontsize=10)
    fig.tight_layout()
    return _save(fig, figures, f"{lang}-anchors_vs_control.png")


#: The diagnostic's three contexts and the line style of each CPT setting in its figure.
DIAGNOSTIC_LOSSES = {"alone": "#7f7f7f", "after_own_context": "#1f77b4", "after_mismatched_context": "#d62728"}
SETTING_STYLES = {"bridges": "-", "no_bridges": "--", "mismatched_bridges": ":"}


def _report_diagnostic(doc: ReportDoc, plan: Plan, figures: Path) -> dict:
    """The bridge diagnostic at the final checkpoint per group and CPT setting (mean over seeds), and its figure."""
    doc.h(2, "Bridge diagnostic: does the model use the other side in context?")
    doc.p(
        "Loss of a held-out pair's second side in three contexts (docs/probing.md, the bridge diagnostic), final "
        "checkpoint, mean over seeds. The model reads its own side when that lowers the loss by over 0.05 in every "
        "seed and another pair's side helps less."
    )
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
        doc.p("No bridge diagnostic outputs found.")
        return section
    doc.table(["run group", "CPT setting", "seeds", "step", "loss alone", "after own side", "after another pair's side",
               "own − alone (per seed)", "reads its own side"], rows)  # fmt: skip
    doc.img(_plot_diagnostic(curves, figures), "Bridge diagnostic during CPT (mean over seeds): loss in three contexts")
    return section


def _plot_diagnostic(curves: dict, figures: Path) -> str:
    plt = _pyplot()
    from matplotlib.lines import Line2D

    keys = sorted({k for k, _ in curves}, key=lambda k: (k.split("/")[1] != "native", k))  # the control first
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for setting, style in SETTING_STYLES.items():
            results = curves.get((key, setting)) or []
            steps = [e["step"] for e in results[0]["checkpoints"]] if results else []
            for loss, color in DIAGNOSTIC_LOSSES.items() if results else ():
                values = np.mean([[e[loss] for e in x["checkpoints"][: len(steps)]] for x in results], axis=0)
                ax.plot(steps, values, style, color=color, marker="o", markersize=2.5)
        ax.set(title=key, xlabel="CPT step", ylabel="loss of the second side (nats/token)")
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=color, label=loss.replace("_", " ")) for loss, color in DIAGNOSTIC_LOSSES.items()]
    handles += [Line2D([], [], color="black", linestyle=style, label=f"trained: {setting.replace('_', ' ')}")
                for setting, style in SETTING_STYLES.items() if any(s == setting for _, s in curves)]  # fmt: skip
    fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return _save(fig, figures, "bridge_diagnostic.png")


def _report_density(doc: ReportDoc, plan: Plan, truth: dict | None) -> dict:
    """Per group: measured occurrences and density per question file and corpus (against the planted counts in a
    synthetic world), and the slope of the per-item gap on log occurrences."""
    doc.h(2, "Cultural density: measured vs planted")
    doc.p("Occurrences and density as `run_density.py` measures them (docs/density.md)"
          + (", against the planted counts of `world/truth.json`." if truth else "."))  # fmt: skip
    section = {}
    for key, group in plan.groups.items():
        result = _read_json(Path(group["density"]) / "density.json")
        if not result:
            if set(SETTINGS) <= set(group["settings"]):  # a group of one setting has no density step
                doc.p(f"{key}: no density output at `{group['density']}/density.json`.")
            continue
        doc.h(3, key)
        measured: dict[tuple[str, str], dict[int, int]] = {}
        for entry in result["questions"]:
            measured.setdefault((entry["questions"], entry["corpus"]), {})[entry["index"]] = entry["occurrences"]
        entries = []
        for row in result["table"]:
            entry = {k: row[k] for k in ("questions", "corpus", "documents", "occurrences", "density")}
            if truth and question_lang_from_stem(row["questions"]) == row["corpus"]:  # the planted counts compare
                planted = [r["counts"][row["corpus"]] for r in truth["questions"][group["lang"]]]
                got = measured.get((row["questions"], row["corpus"]), {})
                top_k = result["setting"]["top_k"]
                entry.update(planted_occurrences=sum(planted), planted_density=sum(planted) / row["documents"],
                             questions_exact=sum(got.get(i) == min(c, top_k) for i, c in enumerate(planted)),
                             questions_planted=len(planted),
                             mean_abs_error=float(np.mean([abs(got.get(i, 0) - c)
                                                           for i, c in enumerate(planted)])))  # fmt: skip
            entries.append(entry)
        doc.table(["questions", "corpus", "documents", "measured occurrences", "measured density",
                   "planted occurrences", "planted density", "questions exact", "mean |error| per question"],
                  [[e["questions"], e["corpus"], f"{e['documents']:,}", e["occurrences"], _f(e["density"], ".3e"),
                    *([e["planted_occurrences"], _f(e["planted_density"], ".3e"),
                       f"{e['questions_exact']}/{e['questions_planted']}", _f(e["mean_abs_error"], ".2f")]
                      if "planted_occurrences" in e else ["–"] * 4)] for e in entries])  # fmt: skip
        analysis = (result.get("instance_analysis") or {}).get("results") or []
        slopes = [_slope_entry(r) for r in analysis]
        if analysis:
            doc.p("Instance-level analysis (first seed, final checkpoint; docs/density.md), 95% bootstrap interval "
                  f"over items. The slope is the {slopes[0]['meaning']}.")  # fmt: skip
            doc.table(["questions", "source corpus", "items", "transferred", "mean occ. transferred", "mean occ. all",
                       "gap slope on log(1 + occ.) [95% CI]", "items in fit", "reading"],
                      [[r["questions"], r["source_corpus"], r["items"], r["transferred"],
                        _f(r["mean_occurrences_transferred"], ".2f"), _f(r["mean_occurrences_all"], ".2f"),
                        _gap(s, "slope") if s["slope"] is not None else "–", s["n_items"], s["reading"]]
                       for r, s in zip(analysis, slopes)])  # fmt: skip
        section[key] = {"density_json": str(Path(group["density"]) / "density.json"), "rows": entries,
                        "instance_analysis": analysis or None, "gap_slopes": slopes}  # fmt: skip
    return section


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
    interval, reading = SLOPE_READINGS[verdict(tuple(fit["slope_ci"]), fit["slope"])]
    return entry | {"verdict": interval, "reading": f"{interval}: {reading}"}


def _report_packing(doc: ReportDoc, plan: Plan) -> dict | None:
    """Each run's packing audit (run_cpt.py): co-location, hashes of its tokens and documents, what it could not
    check; and whether the settings of every seed differ only in co-location."""
    doc.h(2, "Packing audits: the settings differ only in co-location")
    doc.p(
        "Each CPT run's `packing_audit.json` (docs/cpt.md): with bridges 100% of pairs co-located, otherwise 0%, and "
        "equal hashes across the settings of a seed."
    )
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
        doc.p("No packing audits found.")
        return None
    doc.table(["run", "pairs", "co-located", "co-located %", "token multiset hash", "documents-seen hash",
               "real-token fraction", "windows", "audit: guarantees hold"],
              [[e["run"], e["pairs_total"], e["pairs_co_located"], _f(e["co_located_percent"], ".0f"),
                str(e["tokens_multiset_sha256"])[:12], str(e["documents_seen_sha256"])[:12],
                _f(e["real_token_fraction"], ".3f"), e["windows"], e["guarantees_hold"]] for e in entries])  # fmt: skip
    colocation_ok = all(e["co_located_percent"] == (100.0 if e["setting"] == "bridges" else 0.0) for e in entries)
    seeds = [digests for digests in hashes.values() if len(digests) > 1]  # the settings of a seed
    equal_hashes = bool(seeds) and all(len(set(v)) == 1 and None not in v[0] for v in seeds)
    guarantees_hold = all(e["guarantees_hold"] is True for e in entries)
    unchecked = {e["run"]: e["unchecked"] for e in entries if e["unchecked"]}
    doc.bullets([
        "Co-location: " + ("every with-bridges run 100%, every other run 0%." if colocation_ok
                           else "**NOT as required** (see the table): the comparison is not valid."),
        "Same tokens and documents in every setting of a seed: " + (
            "equal hashes." if equal_hashes else "**hashes differ or are missing** for some seed."),
        "Every run's audit: " + ("all guarantees checked and holding." if guarantees_hold
                                 else "**guarantees not all shown to hold** (`guarantees_hold` false or absent)."),
        *(f"**{run}: unchecked**, so not shown to hold: {'; '.join(what)}." for run, what in unchecked.items()),
    ])  # fmt: skip
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
