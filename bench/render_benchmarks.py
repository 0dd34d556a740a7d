"""Renders the figures of README.md and BENCHMARKS.md that come from committed result files, and checks them.

    python bench/render_benchmarks.py            # rewrites every rendered block in place (and the natural plot)
    python bench/render_benchmarks.py --check    # exit 1, naming each block that differs with a diff, if any does

A rendered block in the markdown is delimited by two HTML comments (invisible on GitHub):

    <!-- rendered: KIND from bench/results-committed/FILE.json; edit the run, not this -->TEXT<!-- end rendered -->

KIND names a renderer of `RENDERERS` below, FILE the result file it reads, and TEXT is what the renderer makes of
that file. A table renderer (`block=True`) puts TEXT on lines of its own between blank lines, the markers on lines
of their own; an inline renderer (a figure inside a sentence) keeps TEXT inside its line, and its opening marker must
not start a line (a line that starts with `<!--` ends the paragraph in CommonMark). A figure can therefore only change with
its result file: `tests/test_render_benchmarks.py` runs `--check` on the committed tree.

Result files (`bench/results-committed/`, one per benchmark run) hold what the benchmark script wrote, plus how it
ran: `command`, `date`, the machine and its load (`bench/environment.py`), and the commit where the script does not
record it (`_run`).

`natural_benchmark.json` (written by `bench/collect_natural.py` from `bench/results/natural/`; renderers
`natural_accuracy` and `natural_detection`, plot `bench/figures/natural_benchmark.png`):

    {"_run": {"command", "commit", "date", "run_dates": [first, last], "machine": {...}, "load",
              "added": [{"rows": [method, ...], "commit", "date", "run_dates", "machine", "load", "collected_by"}]},
     "settings": ["human", ...], "seeds": [0, 1, 2], "methods": ["ce", "mopro_adaptive", "mopro_fixed", ...],
     "epochs": 30,
     "accuracy": {setting: {str(seed): {method: null | {"final": 0-1, "best": 0-1, "best_epoch": int,
                                                        "correction_start_epoch": int | null}}}},
     "detection": {setting: {detector: {str(seed): null | {"label_error_precision", "label_error_recall",
                                                            "label_error_f1", "label_quality_auroc", "ood_auroc",
                                                            "fraction_flagged", "flagged_vs_true"}}}}}

A setting's cells name only the methods the protocol runs on it (the own-data rows: human and ood20).
`null` is a run that has not finished (or whose setting's detection report was not made yet): it is rendered as
"missing", never left out, and a mean over the seeds that are there says how many those are.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import statistics
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = ("README.md", "BENCHMARKS.md")
NATURAL_PLOT = Path("bench/figures/natural_benchmark.png")
NATURAL_DETECTION_PLOT = Path("bench/figures/natural_detection.png")
BLOCK = re.compile(
    r"<!-- rendered: (?P<kind>[a-z0-9_]+) from (?P<source>[^\s;]+); edit the run, not this -->"
    r"(?P<body>.*?)<!-- end rendered -->",
    re.S,
)
MISSING = "missing"


@dataclass(frozen=True)
class Renderer:
    """What a block of one kind shows: `render` maps the parsed result file to the block's markdown."""

    render: Callable[[dict], str]
    block: bool  # a table on lines of its own, or a figure inside a sentence


RENDERERS: dict[str, Renderer] = {}


def renderer(kind: str, block: bool = False):
    def register(function: Callable[[dict], str]) -> Callable[[dict], str]:
        RENDERERS[kind] = Renderer(function, block)
        return function

    return register


def _pct(value: float, digits: int = 1) -> str:
    return f"{100 * value:.{digits}f}"


def _mean_sd(values: list[float], digits: int = 2, scale: float = 100, signed: bool = False) -> str:
    if not values:
        return MISSING
    scaled = [scale * v for v in values]
    text = f"{statistics.mean(scaled):{'+' if signed else ''}.{digits}f}"
    return text + (f" ± {statistics.stdev(scaled):.{digits}f}" if len(scaled) > 1 else "")


def _minutes_seconds(seconds: float) -> str:
    whole = round(seconds)
    return f"{whole // 60} min {whole % 60} s"


# --------------------------------------------------------------------------------------- the README's main command
def _demo_result(results: dict) -> str:
    """What the run gave, from its `all_results.json`."""
    return (
        f"{_pct(results['eval_accuracy'], 2)}% clean test accuracy, correction from epoch "
        f"{results['train_noise_correction_start_epoch']:.0f}"
    )


@renderer("demo_command")
def demo_command(data: dict) -> str:
    """Wall time and result of the README's main command (`demo_main_command.json`)."""
    return (
        f"{data['wall_seconds']:.0f} s measured on {data['date']} from a clean clone (commit `{data['commit']}`), "
        f"noise report included; {_demo_result(data['all_results'])}"
    )


@renderer("demo_training")
def demo_training(data: dict) -> str:
    results = data["all_results"]
    return (
        f"{data['date']}: {results['train_runtime']:.0f} s of training, {data['wall_seconds']:.0f} s for the whole "
        f"command; {_demo_result(results)}"
    )


@renderer("demo_report")
def demo_report(data: dict) -> str:
    """The end-of-run noise report's figures against the ground truth the run never saw."""
    r = data["all_results"]
    return (
        f"{_pct(r['noise_label_error_f1'])}% F1 and OOD images with {_pct(r['noise_ood_precision'])}% precision / "
        f"{_pct(r['noise_ood_recall'])}% recall, and the labels its end-of-run decisions keep (corrected where it "
        f"relabels) are {_pct(r['noise_kept_label_accuracy'])}% right, against "
        f"{_pct(r['noise_given_label_accuracy'], 0)}% of the given labels"
    )


# ------------------------------------------------------------------------------------------------ the rehearsal
@renderer("rehearsal_table", block=True)
def rehearsal_table(data: dict) -> str:
    lines = [
        "| row | what (the script's name) | result | wall time (s) | checked on the way |",
        "|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        result = "pass" if row["passed"] else "FAIL: " + "; ".join(row["failures"])
        notes = "; ".join(row["notes"]) or "–"
        lines.append(f"| {row['row']} | {row['name']} | {result} | {row['wall_s']:.0f} | {notes} |")
    lines.append(f"\nIn all {_minutes_seconds(data['total_wall_s'])}; {data['load']}.")
    return "\n".join(lines)


@renderer("rehearsal_summary")
def rehearsal_summary(data: dict) -> str:
    rows = data["rows"]
    passed = [row for row in rows if row["passed"]]
    walls = [f"{row['wall_s']:.0f}" for row in rows]
    verdict = "pass" if len(passed) == len(rows) else f"{len(passed)} of {len(rows)} pass"
    notes = "; ".join(f"row {row['row']}: " + ", ".join(row["notes"]) for row in rows if row["row"] == 4)
    return (
        f"rows 1–{len(rows)} {verdict} in {', '.join(walls[:-1])} and {walls[-1]} s "
        f"({_minutes_seconds(data['total_wall_s'])} in all; {notes})"
    )


# ------------------------------------------------------------------------------------------------ bad inputs
@renderer("bad_inputs_totals")
def bad_inputs_totals(data: dict) -> str:
    t = data["totals"]
    return (
        f"{t['ok']} of {t['cases']} as expected: {t['clear error']} clear errors, {t['skip counted']} skips counted, "
        f"{t['handled']} handled; {t['silent']} silent, {t['lost']} lost, {t['timeout']} timeouts, "
        f"{t['raw traceback']} raw tracebacks, {t['unclear error']} unclear errors"
    )


@renderer("bad_inputs_cases")
def bad_inputs_cases(data: dict) -> str:
    return str(data["totals"]["cases"])


@renderer("bad_inputs_per_command")
def bad_inputs_per_command(data: dict) -> str:
    counts = Counter(row["command"] for row in data["rows"])
    return ", ".join(f"{command} {count}" for command, count in counts.most_common())


def _epochs_said(data: dict) -> str:
    """ "30 epochs", plus the epochs of the rows that ran another count (the own-data recipe's), as recorded."""
    other = sorted({cell["epochs"] for by_seed in data["accuracy"].values() for by_method in by_seed.values()
                    for cell in by_method.values() if cell and cell.get("epochs") not in (None, data["epochs"])})  # fmt: skip
    return f"{data['epochs']} epochs" + (f" (own-data rows: {', '.join(map(str, other))})" if other else "")


def _user_sees(row: dict, width: int = 105) -> str:
    """The first line the user saw (the temporary folder shortened to `…/`), or the case's note in brackets."""
    message = re.sub(r"/tmp/", "…/", row["message"])
    if len(message) > width:
        message = message[:width] + "..."
    text = message or (f"({row['note']})" if row["note"] else "")
    return text.replace("|", "\\|")


@renderer("bad_inputs_table", block=True)
def bad_inputs_table(data: dict) -> str:
    lines = ["| input | command | expected | outcome | what the user sees |", "|---|---|---|---|---|"]
    for row in data["rows"]:
        expected = row["expected"].replace("|", "\\|")
        lines.append(f"| `{row['name']}` | {row['command']} | {expected} | {row['outcome']} | {_user_sees(row)} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ speed
@renderer("gpu_benchmark_table", block=True)
def gpu_benchmark_table(data: dict) -> str:
    from bench.gpu_benchmark import format_table  # the table the script itself prints

    return f"```\n{data['command']}\n{format_table(data)}\n```"


def _load(data: dict) -> str:
    before, after = data["load_average"]["before"][0], data["load_average"]["after"][0]
    return f"load average {before:.1f} → {after:.1f} on {data['machine']['cpu_count']} cores"


def _at_commit(data: dict) -> str:
    """`at commit X` from the `_run` stamp added to result files whose script does not record its commit."""
    return f"at commit `{data['_run']['commit']}`"


@renderer("prototype_update_table", block=True)
def prototype_update_table(data: dict) -> str:
    shape = data["shape"]
    return "\n".join([
        "| | median ms |",
        "|---|---|",
        f"| official loop `for z, y in zip(q, labels): p[y] = m p[y] + (1-m) z` | {data['official_loop_ms']['median']:.2f} |",
        "| `update_prototypes` (closed form: per-sample weight `(1-m) m^(later same-class samples)`, one "
        f"`index_add_`), alternating with the loop | {data['update_prototypes_ms']['median']:.3f} |",
        f"| `update_prototypes`, back to back | {data['update_prototypes_warm_ms']['median']:.3f} |",
        "",
        f"N × K × D = {shape['samples']} × {shape['classes']} × {shape['dim']}, {data['repetitions']} repetitions, "
        f"{data['machine']['torch_threads']} thread, {data['date'][:10]} {_at_commit(data)}, load average "
        f"{data['machine']['load_average'][0]:.1f} on {data['machine']['cpu_count']} cores: "
        f"**{data['speedup_median']:.1f}×** alternated, {data['speedup_median_warm']:.1f}× back to back; "
        f"largest difference to the loop {data['max_abs_diff']:.1e}.",
    ])  # fmt: skip


@renderer("prototype_update_headline")
def prototype_update_headline(data: dict) -> str:
    machine = data["machine"]
    return (
        f"{data['speedup_median']:.0f}× alternated, {data['speedup_median_warm']:.0f}× back to back ({data['date'][:10]}, "
        f"load average {machine['load_average'][0]:.1f} on {machine['cpu_count']} cores)"
    )


def _step(result: dict, name: str) -> dict | None:
    return result["steps"].get(name)


@renderer("step_time_table", block=True)
def step_time_table(data: dict) -> str:
    settings = data["settings"]
    lines = [
        "| config (CPU) | CE img/s | MoPro img/s | official-style img/s | MoPro / CE | official / CE | floor | "
        "MoPro / floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in data["results"]:
        ce, mopro, official = (_step(result, n) for n in ("CE", "MoPro", "MoPro official-style"))
        lines.append(
            f"| {result['backbone']} @{result['image_size']}, batch {result['batch_size']} | "
            f"{ce['img_per_s_median']:.2f} | {mopro['img_per_s_median']:.2f} | "
            f"{official['img_per_s_median']:.2f} | {mopro['ratio_to_ce_median']:.3f} | "
            f"{official['ratio_to_ce_median']:.3f} | {result['floor_ratio']:.3f} | {result['mopro_ratio_over_floor']:.3f} |"
        )
    lines.append(
        f"\n{settings['momentum_encoder_bn_groups']} key BatchNorm group(s), {settings['repetitions']} repetitions × "
        f"{settings['steps_per_repetition']} step, {data['machine']['torch_threads']} thread, {data['date'][:10]} "
        f"{_at_commit(data)}, "
        f"{_load(data)}."
    )
    return "\n".join(lines)


@renderer("step_time_headline")
def step_time_headline(data: dict) -> str:
    ratios = [r["steps"]["MoPro"]["ratio_to_ce_median"] for r in data["results"]]
    floors = [r["floor_ratio"] for r in data["results"]]
    above = [r["mopro_ratio_over_floor"] - 1 for r in data["results"]]
    return (
        f"{min(ratios):.2f}–{max(ratios):.2f}× a CE step, {100 * min(above):.0f} to {100 * max(above):.0f}% from the "
        f"floor of {min(floors):.2f}–{max(floors):.2f} that the extra key forward sets "
        f"({data['settings']['momentum_encoder_bn_groups']} key BatchNorm group(s), quick run of {data['date'][:10]})"
    )


@renderer("data_pipeline_table", block=True)
def data_pipeline_table(data: dict) -> str:
    setup = data["setup"]
    lines = ["| pipeline | img/s (median) | vs official (paired median) |", "|---|---|---|"]
    for row in data["pipelines"]:
        name = f"**{row['pipeline']}**" if "shipped" in row["pipeline"] else row["pipeline"]
        lines.append(f"| {name} | {row['img_per_s_median']:.1f} | {row['speedup_vs_official_median']:.2f} |")
    decode, jitter = data["decode_ms_per_image"], data["colour_jitter_ms_per_crop"]
    lines.append(
        f"\n{setup['images']} JPEGs ({setup['mean_file_kb']:.1f} kB on average), {setup['repetitions']} repetitions, "
        f"{data['date'][:10]} {_at_commit(data)}, {_load(data)}. Decoding (ms per image): "
        + ", ".join(f"{name} {ms:.2f}" for name, ms in decode.items())
        + "; colour jitter (ms per crop): "
        + ", ".join(f"{name} {ms:.2f}" for name, ms in jitter.items())
        + "."
    )
    return "\n".join(lines)


@renderer("data_pipeline_headline")
def data_pipeline_headline(data: dict) -> str:
    shipped = next(row for row in data["pipelines"] if "shipped" in row["pipeline"])
    return f"{shipped['speedup_vs_official_median']:.2f}× ({data['date'][:10]}, {_load(data)})"


# ------------------------------------------------------------------------------------------- natural images
METHOD_NAMES = {
    "ce": "CE",
    "mopro_adaptive": "MoPro, adaptive",
    "mopro_fixed": "MoPro, fixed (epoch 4)",
    "mopro_queue_vote": "MoPro, queue_vote (added option)",
    "own_ce": "CE, own-data recipe (40 epochs)",
    "own_mopro_adaptive": "MoPro, own-data recipe (40 epochs)",
    "own_length_ce": "CE, own-data recipe (length rule)",
    "own_length_mopro_adaptive": "MoPro, own-data recipe (length rule)",
    "own_os16_ce": "CE, own-data recipe + output stride 16 (tried)",
    "own_os16_mopro_adaptive": "MoPro, own-data recipe + output stride 16 (tried)",
}


SHORT_NAMES = {"ce": "CE", "mopro_adaptive": "MoPro\nadaptive", "mopro_fixed": "MoPro\nfixed", "mopro_queue_vote": "MoPro\nqueue_vote",
               "own_ce": "CE\nown s32", "own_mopro_adaptive": "MoPro\nown s32", "own_os16_ce": "CE\nown s16",
               "own_os16_mopro_adaptive": "MoPro\nown s16", "own_length_ce": "CE\nown rule",
               "own_length_mopro_adaptive": "MoPro\nown rule"}  # fmt: skip


def _methods_in(data: dict, setting: str) -> list[str]:
    """The methods the protocol runs on `setting` (the own-data rows run on two settings only)."""
    cells = data["accuracy"].get(setting, {})
    return [m for m in data["methods"] if any(m in cells.get(str(s), {}) for s in data["seeds"])]


def _seed_values(data: dict, setting: str, method: str, key: str) -> list[float | None]:
    cells = data["accuracy"].get(setting, {})
    return [(cells.get(str(s), {}).get(method) or {}).get(key) for s in data["seeds"]]


def _available(values: list) -> list:
    return [v for v in values if v is not None]


def _of_seeds(values: list, total: int) -> str:
    """How many seeds a mean stands on, where that is not all of them (none: the cell says missing)."""
    return "" if len(values) in (0, total) else f" ({len(values)} of {total} seeds)"


@renderer("natural_accuracy", block=True)
def natural_accuracy(data: dict) -> str:
    seeds = data["seeds"]
    lines = [
        f"| setting | method | final clean test accuracy, seeds {' / '.join(map(str, seeds))} | final, mean ± sd | "
        "best epoch, mean | − CE, paired by seed | final below best (mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for setting in data["settings"]:
        ce_final = _seed_values(data, setting, "ce", "final")
        for method in _methods_in(data, setting):
            final = _seed_values(data, setting, method, "final")
            best = _seed_values(data, setting, method, "best")
            per_seed = " / ".join(MISSING if v is None else _pct(v, 2) for v in final)
            have, have_best = _available(final), _available(best)
            paired = [f - c for f, c in zip(final, ce_final, strict=True) if f is not None and c is not None]
            vs_ce = "" if method == "ce" else _mean_sd(paired, signed=True) + _of_seeds(paired, len(seeds))
            drop = [b - f for f, b in zip(final, best, strict=True) if f is not None and b is not None]
            lines.append(
                f"| {setting} | {METHOD_NAMES.get(method, method)} | {per_seed} | "
                f"{_mean_sd(have)}{_of_seeds(have, len(seeds))} | {_mean_sd(have_best).split(' ±')[0]} | {vs_ce} | "
                f"{_mean_sd(drop).split(' ±')[0]} |"
            )
    run = data["_run"]
    lines.append(
        f"\n{_epochs_said(data)}; runs finished {' to '.join(run['run_dates'])} at commit `{run['commit']}`, "
        f"{run['load']}; `{run['command']}`."
    )
    for added in run.get("added", []):  # rows run later (bench/collect_natural.py --rows)
        names = "; ".join(METHOD_NAMES.get(row, row) for row in added["rows"])
        dates = " to ".join(dict.fromkeys(added["run_dates"]))  # one day said once
        lines.append(f"Added later ({names}): runs finished {dates} at commit `{added['commit']}`, {added['load']}; "
                     f"added by `python bench/collect_natural.py --rows {' '.join(added['rows'])}`.")  # fmt: skip
    return "\n".join(lines)


@renderer("small_image_dev", block=True)
def small_image_dev(data: dict) -> str:
    """Per variant and method: final accuracy per seed, mean, paired gain over stride 32, train time ratio."""
    runs = [r for r in data["runs"].values() if r]
    seeds = sorted({r["seed"] for r in runs})
    lines = [f"| variant | method | final clean test accuracy, seeds {' / '.join(map(str, seeds))} | mean | "
             "− stride32, paired by seed | train time / stride32's |", "|---|---|---|---|---|---|"]  # fmt: skip
    base = {(r["method"], r["seed"]): r for r in runs if r["variant"] == "stride32"}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        for method in dict.fromkeys(r["method"] for r in runs if r["variant"] == variant):
            mine = {r["seed"]: r for r in runs if (r["variant"], r["method"]) == (variant, method)}
            finals = " / ".join(_pct(mine[s]["final"], 2) if s in mine else "not run" for s in seeds)
            pairs = [(mine[s], base[(method, s)]) for s in mine if (method, s) in base]
            gain = "" if variant == "stride32" else _mean_sd([a["final"] - b["final"] for a, b in pairs], signed=True)
            ratio = statistics.mean(a["train_runtime"] / b["train_runtime"] for a, b in pairs)
            lines.append(f"| {variant} | {method} | {finals} | {_mean_sd([r['final'] for r in mine.values()])} | "
                         f"{gain} | {ratio:.2f} |")  # fmt: skip
    lines.append(f"\n{data['epochs']} epochs; collected {data['date'][:10]} at commit `{data['commit']}`, "
                 f"{data['load']}; `{data['run_command']}`.")  # fmt: skip
    return "\n".join(lines)


@renderer("noise_rule_dev", block=True)
def noise_rule_dev(data: dict) -> str:
    """The report's label decisions on the development models: both rules per seed, then the simulated noise levels."""
    names = {"two_mode_fit": "two-mode fit", "confident_learning": "confident learning"}
    runs = data["runs"]
    lines = ["| seed | rule | flagged / truly wrong | label-error P | R | F1 | relabel accuracy |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for run in runs:
        for rule in data["rules"]:
            r = run["given"][rule]
            relabel = MISSING if r["relabel_accuracy"] is None else _pct(r["relabel_accuracy"])
            lines.append(f"| {run['seed']} | {names[rule]} | {_pct(r['flagged'])}% / {_pct(r['truly_wrong'])}% | "
                         f"{_pct(r['precision'])} | {_pct(r['recall'])} | {_pct(r['f1'])} | {relabel} |")  # fmt: skip
    f1 = {rule: [run["given"][rule]["f1"] for run in runs] for rule in data["rules"]}
    gain = [b - a for a, b in zip(f1["two_mode_fit"], f1["confident_learning"], strict=True)]
    lines.append(f"\nMean F1: two-mode fit {_mean_sd(f1['two_mode_fit'], 1)}, confident learning "
                 f"{_mean_sd(f1['confident_learning'], 1)}; paired by seed {_mean_sd(gain, 1, signed=True)} "
                 f"({', '.join(f'{100 * g:+.1f}' for g in gain)}).\n")  # fmt: skip
    seeds = " / ".join(str(run["seed"]) for run in runs)
    lines += [f"| simulated symmetric noise | truly wrong | flagged, two-mode fit (seeds {seeds}) | flagged, confident "
              "learning | F1, two-mode fit | F1, confident learning |", "|---|---|---|---|---|---|"]  # fmt: skip

    def per_seed(rows: list[dict], rule: str, key: str, digits: int = 1, scale: float = 100) -> str:
        return " / ".join(f"{scale * row[rule][key]:.{digits}f}" for row in rows)

    for k, level in enumerate(row["noise"] for row in runs[0]["simulated"]):
        rows = [run["simulated"][k] for run in runs]
        f1_cells = [per_seed(rows, rule, "f1", 3, 1) if level else "–" for rule in data["rules"]]
        wrong = statistics.mean(row["confident_learning"]["truly_wrong"] for row in rows)
        lines.append(f"| {level:.0%} | {_pct(wrong)}% | {per_seed(rows, 'two_mode_fit', 'flagged')} | "
                     f"{per_seed(rows, 'confident_learning', 'flagged')} | {f1_cells[0]} | {f1_cells[1]} |")  # fmt: skip
    lines.append(f"\nScored {data['date'][:10]} at commit `{data['commit']}`; `{data['command']}`.")
    return "\n".join(lines)


@renderer("label_evidence", block=True)
def label_evidence(data: dict) -> str:
    """Per run, the noise report's label decisions with each label evidence, and the mean F1 per evidence."""
    names = {"neighbours": "neighbour vote", "training": "training record", "combined": "mean of both (default)"}
    lines = ["| data | seed | schedule | record epochs | evidence | label-error P | R | F1 | label-quality AUROC | "
             "flagged / truly wrong | relabelling refused |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in data["rows"]:
        for evidence, cell in row["evidence"].items():
            auroc = MISSING if cell["label_quality_auroc"] is None else f"{cell['label_quality_auroc']:.3f}"
            ratio = MISSING if cell["flagged_vs_true"] is None else f"{cell['flagged_vs_true']:.2f}"
            rates = [MISSING if cell[k] is None else _pct(cell[k])
                     for k in ("label_error_precision", "label_error_recall", "label_error_f1")]  # fmt: skip
            lines.append(f"| {row['data'].replace('_', ' ')} | {row['seed']} | {row['correction_schedule']} | "
                         f"{row['record_epochs_mean']:.1f} | {names[evidence]} | {' | '.join(rates)} | {auroc} | "
                         f"{ratio} | {'yes' if cell['relabel_refused'] else 'no'} |")  # fmt: skip
    means = []
    for evidence, name in names.items():
        f1 = [row["evidence"][evidence]["label_error_f1"] or 0.0 for row in data["rows"]]
        means.append(f"{name} {_mean_sd(f1, 1)}")
    lines.append(f"\nMean label-error F1 over the {len(data['rows'])} runs (an F1 undefined because nothing was flagged counts as 0): {'; '.join(means)}. "
                 f"Scored {data['date'][:10]} at commit `{data['commit']}`; `{data['command']}`.")  # fmt: skip
    return "\n".join(lines)


@renderer("natural_run_length", block=True)
def natural_run_length(data: dict) -> str:
    """The own-data recipe at 120 epochs against the same setting, seed and method at 40 epochs and in the demo recipe."""
    names = {"ce": "CE", "mopro": "MoPro"}
    lines = [f"| setting | seed | method | final at {data['epochs']} epochs (best, its epoch) | correction from epoch | "
             "− own-data recipe, 40 epochs | − demo recipe, 30 epochs | MoPro − CE |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    by_key = {(r["setting"], r["seed"], r["method"]): r for r in data["runs"]}
    for (setting, seed, method), r in sorted(by_key.items()):
        ce = by_key.get((setting, seed, "ce"))
        versus_ce = f"{100 * (r['final'] - ce['final']):+.2f}" if method == "mopro" and ce else ""
        start = "–" if r["correction_start_epoch"] is None else str(r["correction_start_epoch"])
        lines.append(f"| {setting} | {seed} | {names[method]} | {_pct(r['final'], 2)} ({_pct(r['best'], 2)}, "
                     f"{r['best_epoch']}) | {start} | {100 * (r['final'] - r['own_data_40']['final']):+.2f} | "
                     f"{100 * (r['final'] - r['demo_recipe']['final']):+.2f} | {versus_ce} |")  # fmt: skip
    lines.append(f"\nTrained at commit `{data['commit']}` (collected {data['date'][:10]}); `{data['command']}`.")
    return "\n".join(lines)


@renderer("run_length_dev", block=True)
def run_length_dev(data: dict) -> str:
    """The own-data recipe's length on the natural development pool: each run's epochs, steps and accuracy."""
    names = {"ce": "CE", "mopro": "MoPro"}
    lines = ["| setting | seed | method | epochs | steps | final (%) | best (%), its epoch | correction from epoch |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(data["runs"], key=lambda r: (r["setting"], r["seed"], r["method"], r["steps"])):
        start = "–" if r["correction_start_epoch"] is None else str(r["correction_start_epoch"])
        lines.append(f"| {r['setting']} | {r['seed']} | {names[r['method']]} | {r['epochs_asked']} | {r['steps']} | "
                     f"{_pct(r['final'], 2)} | {_pct(r['best'], 2)}, {r['best_epoch']} | {start} |")  # fmt: skip
    chosen = ", ".join(f"{key}: {steps} steps" for key, steps in data["fewest_steps_reaching_the_best"].items())
    lines.append(f"\nFewest steps within {100 * data['tolerance']:g} point of the best MoPro run: {chosen or 'none'}. "
                 f"Trained at commit `{data['commit']}` (collected {data['date'][:10]}); `{data['command']}`.")  # fmt: skip
    return "\n".join(lines)


@renderer("natural_stride16_gain")
def natural_stride16_gain(data: dict) -> str:
    """The own-data rows with output stride 16 minus those without, paired by setting and seed, per method."""
    gains: dict[str, list[float]] = {"ce": [], "mopro_adaptive": []}
    for by_seed in data["accuracy"].values():
        for cells in by_seed.values():
            for method, values in gains.items():
                dilated, plain = cells.get(f"own_os16_{method}"), cells.get(f"own_{method}")
                if dilated and plain:
                    values.append(dilated["final"] - plain["final"])
    every = gains["ce"] + gains["mopro_adaptive"]
    parts = [f"{name} {_mean_sd(values, signed=True)} ({len(values)} pairs)"
             for name, values in (("CE", gains["ce"]), ("MoPro", gains["mopro_adaptive"]), ("all", every))]  # fmt: skip
    return ", ".join(parts)


DETECTION_COLUMNS = (  # (key, header, as a rate in %)
    ("label_error_precision", "label-error P", True),
    ("label_error_recall", "label-error R", True),
    ("label_error_f1", "label-error F1", True),
    ("label_quality_auroc", "label-quality AUROC", False),
    ("ood_auroc", "OOD AUROC", False),
    ("flagged_vs_true", "flagged / truly wrong", False),
)


@renderer("natural_detection", block=True)
def natural_detection(data: dict) -> str:
    seeds = data["seeds"]
    header = " | ".join(h for _, h, _ in DETECTION_COLUMNS)
    lines = [f"| setting | detector | seeds scored | {header} |", "|---|---|---|" + "---|" * len(DETECTION_COLUMNS)]
    for setting in data["settings"]:
        detectors = data["detection"].get(setting) or {}
        if not detectors:
            lines.append(f"| {setting} | all | {MISSING} |" + f" {MISSING} |" * len(DETECTION_COLUMNS))
            continue
        for detector, by_seed in detectors.items():
            present = [by_seed.get(str(s)) for s in seeds]
            scored = ", ".join(str(s) for s, p in zip(seeds, present, strict=True) if p) or "none"
            cells = []
            for key, _, rate in DETECTION_COLUMNS:
                values = _available([p.get(key) for p in present if p])
                cells.append(_mean_sd(values, 1 if rate else 3, 100 if rate else 1) if values else "–")
            lines.append(f"| {setting} | {detector} | {scored} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_natural(data: dict, path: Path) -> None:
    """Final clean test accuracy per setting and method: a dot per seed, a bar for the mean, `x` for a missing run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    settings = data["settings"]
    widths = [max(1, len(_methods_in(data, setting))) for setting in settings]  # a panel's width follows its bars
    figure = Figure(figsize=(0.7 * sum(widths) + 1.5, 3.6), dpi=100)
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(1, len(settings), width_ratios=widths)
    finals = [100 * v for st in settings for m in _methods_in(data, st) for v in _seed_values(data, st, m, "final")
              if v is not None]  # fmt: skip
    top = min(100, 10 * math.ceil(max(finals, default=90) / 10) + 10)  # room above the highest dot
    colours = {"ce": "tab:blue", "mopro_adaptive": "tab:orange", "mopro_fixed": "tab:red",
               "mopro_queue_vote": "tab:green", "own_ce": "tab:cyan", "own_mopro_adaptive": "tab:olive",
               "own_os16_ce": "tab:purple", "own_os16_mopro_adaptive": "tab:brown", "own_length_ce": "tab:pink",
               "own_length_mopro_adaptive": "tab:gray"}  # fmt: skip
    for position, setting in enumerate(settings):
        axes = figure.add_subplot(grid[0, position])
        methods = _methods_in(data, setting)
        for x, method in enumerate(methods):
            values = _seed_values(data, setting, method, "final")
            have = [100 * v for v in values if v is not None]
            if have:
                axes.bar(x, statistics.mean(have), color=colours.get(method, "tab:gray"), alpha=0.6)
                axes.plot([x] * len(have), have, "k.", markersize=6)
            missing = len(values) - len(have)
            if missing:
                axes.text(x, 2, f"{missing} missing", ha="center", va="bottom", rotation=90, fontsize=7)
        axes.set_xticks(range(len(methods)), [SHORT_NAMES.get(m, m) for m in methods], fontsize=7)
        axes.set_xlim(-0.6, len(methods) - 0.4)
        axes.set_ylim(0, top)
        axes.set_title(setting, fontsize=10)
        axes.grid(axis="y", alpha=0.3)
    figure.axes[0].set_ylabel("final clean test accuracy (%)")
    figure.suptitle(f"Natural images (CIFAR-10 photos, {_epochs_said(data)}): final clean accuracy", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(str(path), format="png")


def plot_natural_detection(data: dict, path: Path) -> None:
    """Per setting, label-error F1 and OOD AUROC of each detector: a dot per seed, a bar for the mean."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    settings = [s for s in data["settings"] if data["detection"].get(s)]
    figure = Figure(figsize=(3.4 * len(settings) + 2.6, 4.2), dpi=100)
    FigureCanvasAgg(figure)
    detectors = list(dict.fromkeys(d for s in settings for d in data["detection"][s]))
    colours = dict(zip(detectors, ("tab:red", "lightcoral", "tab:orange", "navajowhite", "tab:blue", "tab:gray"),
                       strict=False))  # fmt: skip
    panels = [(s, "label_error_f1", 100, "label-error F1 (%)") for s in settings]
    if "ood20" in settings:
        panels.append(("ood20", "ood_auroc", 1, "OOD AUROC"))
    for position, (setting, key, scale, label) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, len(panels), position)
        names = [d for d in detectors if any(c and c.get(key) is not None
                                             for c in data["detection"][setting].get(d, {}).values())]  # fmt: skip
        for x, name in enumerate(names):
            values = [
                scale * c[key] for c in data["detection"][setting][name].values() if c and c.get(key) is not None
            ]
            axes.bar(x, statistics.mean(values), color=colours.get(name, "tab:gray"), alpha=0.8)
            axes.plot([x] * len(values), values, "k.", markersize=5)
        axes.set_xticks(range(len(names)), [n.replace("MoPro adaptive", "MoPro ad.").replace(", ", "\n")
                                            for n in names], fontsize=6, rotation=90)  # fmt: skip
        axes.set_title(f"{setting}: {label}", fontsize=9)
        axes.grid(axis="y", alpha=0.3)
        axes.set_ylim(0, 100 if scale == 100 else 1)
    figure.suptitle("Natural images: finding wrong labels (F1) and OOD photos (AUROC), the noise report (MoPro, both "
                    "schedules) vs cleanlab", fontsize=10)  # fmt: skip
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(str(path), format="png")


# ------------------------------------------------------------------------------------------------ the mechanism
@dataclass
class Finding:
    document: str
    line: int
    kind: str
    source: str
    committed: str
    rendered: str


class RenderError(ValueError):
    """A block that cannot be rendered: unknown kind, missing or unreadable result file."""


def render_text(text: str, root: Path, document: str = "") -> tuple[str, list[Finding]]:
    """The document with every block rendered, and each block (with its committed and its rendered text)."""
    findings = []

    def replace(match: re.Match) -> str:
        kind, source, body = match["kind"], match["source"], match["body"]
        line = text.count("\n", 0, match.start()) + 1
        if kind not in RENDERERS:
            raise RenderError(f"{document}:{line}: unknown renderer {kind!r} (known: {', '.join(sorted(RENDERERS))})")
        at_line_start = match.start() == 0 or text[match.start() - 1] == "\n"
        if at_line_start != RENDERERS[kind].block:
            where = "start a line" if RENDERERS[kind].block else "follow text on its line (not start it)"
            raise RenderError(f"{document}:{line}: the marker of {kind} must {where}")
        try:
            data = json.loads((root / source).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise RenderError(f"{document}:{line}: block {kind} cannot read {source}: {error}") from error
        try:
            rendered = RENDERERS[kind].render(data)
        except (KeyError, TypeError, IndexError) as error:  # a result file of another kind, or an older layout
            raise RenderError(f"{document}:{line}: block {kind} cannot render {source}: {error!r}") from error
        if RENDERERS[kind].block:  # blank lines: a table or code block is a block of its own in any markdown
            rendered = f"\n\n{rendered}\n\n"
        findings.append(Finding(document, line, kind, source, body, rendered))
        return match[0][: match.start("body") - match.start()] + rendered + "<!-- end rendered -->"

    return BLOCK.sub(replace, text), findings


def check(root: Path, documents=DOCUMENTS) -> list[Finding]:
    """The blocks whose committed text differs from their rendering."""
    stale = []
    for document in documents:
        _, findings = render_text((root / document).read_text(), root, document)
        stale += [f for f in findings if f.committed != f.rendered]
    return stale


def describe(finding: Finding, max_lines: int = 12) -> str:
    diff = list(difflib.unified_diff(finding.committed.strip("\n").splitlines(),
                                     finding.rendered.strip("\n").splitlines(),
                                     "committed", "rendered", lineterm="", n=0))  # fmt: skip
    shown = diff[:max_lines] + ([f"... {len(diff) - max_lines} more diff lines"] if len(diff) > max_lines else [])
    return (f"{finding.document}:{finding.line}: block {finding.kind} differs from its rendering of "
            f"{finding.source}\n" + "\n".join("    " + line for line in shown))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block differs")
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository (for tests: a copy of it)")
    args = parser.parse_args(argv)
    try:
        if args.check:
            stale = check(args.root)
            for finding in stale:
                print(describe(finding))
            blocks = sum(len(render_text((args.root / d).read_text(), args.root, d)[1]) for d in DOCUMENTS)
            print(f"{len(stale)} of {blocks} rendered blocks differ from their result files" if stale
                  else f"all {blocks} rendered blocks match their result files")  # fmt: skip
            return 1 if stale else 0
        for document in DOCUMENTS:
            path = args.root / document
            text, findings = render_text(path.read_text(), args.root, document)
            path.write_text(text)
            changed = sum(f.committed != f.rendered for f in findings)
            print(f"{document}: {len(findings)} blocks, {changed} rewritten")
        natural = args.root / "bench/results-committed/natural_benchmark.json"
        if natural.is_file():
            plot_natural(json.loads(natural.read_text()), args.root / NATURAL_PLOT)
            plot_natural_detection(json.loads(natural.read_text()), args.root / NATURAL_DETECTION_PLOT)
            print(f"wrote {NATURAL_PLOT} and {NATURAL_DETECTION_PLOT}")
        return 0
    except RenderError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # bench.gpu_benchmark for its table
    sys.exit(main())
