"""The images behind a noise report: the flagged samples as thumbnails, for the Hub's viewer and for a browser.

Two views of the same selection (`flagged_rows`): per given class, the relabelled samples most likely mislabelled
(lowest `label_quality` first) and the out-of-distribution ones most likely foreign (highest `ood_score` first), at
most `per_class` of each.

- `flagged_images_dataset`: a `datasets.Dataset` with an `image` column (`datasets.Image`, JPEG thumbnails of at most
  `thumbnail_size` px a side) beside the report's columns for those rows. The noise report saves it as its
  `flagged_images` configuration (`datasets.load_from_disk("noise_report/flagged_images")`; on the Hub
  `load_dataset(repo, "flagged_images")`), so the dataset viewer shows each image with its given and suggested
  labels and scores, while the full per-sample table stays image-free (2.4M WebVision rows stay small).
- `write_gallery`: `index.html` with the thumbnails beside it (`gallery/*.jpg`, relative links: the folder opens
  offline in any browser, and can be moved or zipped whole). Per class: counts, the relabelled images
  (given -> suggested) and the OOD ones, each sorted by score; on top, the report's summary.
"""

from __future__ import annotations

import html
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .noise_report_card import TRUTH_ROWS, _format_measure, _percent
from .noise_scores import DECISIONS

GALLERY_FILE = "index.html"
THUMBNAIL_DIR = "gallery"
FLAGGED_CONFIG = "flagged_images"
DEFAULT_THUMBNAIL_SIZE = 96
DEFAULT_PER_CLASS = 12
# The score that ranks each flagged decision, and whether high values come first.
RANKING = {"relabelled": ("label_quality", False), "ood": ("ood_score", True)}


def flagged_rows(report, per_class: int) -> list[int]:
    """Row positions of the flagged samples to show: per given class (in label order), the relabelled ones then the
    OOD ones, each the `per_class` best by its score (`RANKING`), best first."""
    given = np.asarray(report["given_label"])
    decision = np.asarray(report["decision"])
    scores = {score: np.asarray(report[score], dtype=np.float64) for score, _ in RANKING.values()}
    rows: list[int] = []
    for label in np.unique(given):
        in_class = given == label
        for name, (score, descending) in RANKING.items():
            candidates = np.flatnonzero(in_class & (decision == name))
            values = scores[score][candidates]
            order = np.argsort(-values if descending else values, kind="stable")
            rows.extend(int(i) for i in candidates[order][:per_class])
    return rows


def thumbnail(source, size: int) -> bytes:
    """A JPEG thumbnail (longest side at most `size` px, never enlarged) of any image source the data pipeline reads
    (path, bytes, `datasets.Image(decode=False)` dict, PIL image)."""
    from PIL import Image

    from training.data.transforms import decode_image

    image = decode_image(source)  # RGB
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def flagged_images_dataset(report, rows: Sequence[int], images: Sequence, size: int = DEFAULT_THUMBNAIL_SIZE):
    """The report's `rows` with an `image` column of thumbnails (first), the report's features kept.

    Args:
        report: the noise report (`datasets.Dataset`, class labels as `ClassLabel`).
        rows: report rows to include (`flagged_rows`).
        images: the image source of each report row (same order as the report).
        size: the thumbnails' longest side in pixels.
    """
    import datasets

    selected = report.select(rows)
    features = datasets.Features({"image": datasets.Image(), **selected.features})
    columns = {"image": [{"bytes": thumbnail(images[i], size), "path": None} for i in rows], **selected.to_dict()}
    return datasets.Dataset.from_dict(columns, features=features)


def _class_counts(report, num_classes: int) -> dict[str, np.ndarray]:
    given, decision = np.asarray(report["given_label"]), np.asarray(report["decision"])
    counts = {name: np.bincount(given[decision == name], minlength=num_classes) for name in DECISIONS}
    counts["samples"] = np.bincount(given, minlength=num_classes)
    return counts


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1400px; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin: 1.4em 0 0.3em; border-top: 1px solid #ddd; padding-top: .6em; }
h3 { font-size: 0.95em; margin: 0.6em 0 0.2em; color: #444; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { border: 1px solid #ccc; padding: 2px 8px; }
td.n { text-align: right; }
.grid { display: flex; flex-wrap: wrap; gap: 6px; }
figure { margin: 0; width: 112px; font-size: 11px; text-align: center; }
figure img { width: 96px; height: 96px; object-fit: contain; image-rendering: pixelated; background: #f3f3f3;
             border: 2px solid #e69f00; }
section.ood figure img { border-color: #d55e00; }
figcaption { overflow-wrap: anywhere; } .muted { color: #777; } .layout { display: flex; gap: 2em; flex-wrap: wrap; }
img.plot { max-width: 400px; }
"""


def write_gallery(
    report,
    flagged,
    summary: Mapping,
    class_names: Sequence[str],
    output_dir: str | Path,
    scorer: str,
    per_class: int,
    thumbnail_size: int,
    data_description: str | None = None,
    plot_file: str | None = "noise_report.png",
) -> Path:
    """Writes `output_dir/index.html` and its thumbnails (`output_dir/gallery/`) and returns the page's path.

    Args:
        report: the full noise report (for the per-class counts).
        flagged: `flagged_images_dataset` of the report (the images shown, in `flagged_rows` order).
        summary: the report's summary (`summarize_noise_report`).
        class_names: class names in label order.
        scorer: who scored the data (shown as given).
        per_class / thumbnail_size: the selection's bound and the thumbnails' size, stated on the page.
    """
    output_dir = Path(output_dir)
    thumbs = output_dir / THUMBNAIL_DIR
    thumbs.mkdir(parents=True, exist_ok=True)
    for old in thumbs.glob("*.jpg"):  # an overwritten report must not keep the last one's images
        old.unlink()
    num_classes = len(class_names)
    counts = _class_counts(report, num_classes)
    names = flagged.features["given_label"].names
    columns = flagged.remove_columns("image").to_dict()
    encoded = flagged.cast_column("image", _undecoded())["image"]
    shown: dict[tuple[int, str], list[str]] = {}
    for k in range(len(flagged)):
        path = f"{THUMBNAIL_DIR}/{k:06d}.jpg"
        (output_dir / path).write_bytes(encoded[k]["bytes"])
        given, suggested = columns["given_label"][k], columns["suggested_label"][k]
        decision = columns["decision"][k]
        sample_id = html.escape(str(columns["id"][k]))
        if decision == "relabelled":
            caption = (
                f"{html.escape(names[given])} &rarr; <b>{html.escape(names[suggested])}</b><br>"
                f"label quality {columns['label_quality'][k]:.3g}"
            )
        else:
            caption = f"given {html.escape(names[given])}<br>OOD score {columns['ood_score'][k]:.3g}"
        shown.setdefault((given, decision), []).append(
            f'<figure data-id="{sample_id}"><img src="{path}" alt="{sample_id}" title="{sample_id}">'
            f"<figcaption>{caption}</figcaption></figure>"
        )

    decision_rows = "\n".join(
        f'<tr><td>{name}</td><td class="n" id="num-{name}">{summary[f"num_{name}"]}</td>'
        f'<td class="n">{_percent(summary[f"fraction_{name}"])}</td></tr>'
        for name in DECISIONS
    )
    truth = [(text, _format_measure(key, summary[key])) for key, text in TRUTH_ROWS if key in summary]
    truth_table = ""
    if truth:
        rows = "\n".join(f'<tr><td>{_code_spans(t)}</td><td class="n">{v}</td></tr>' for t, v in truth)
        truth_table = f"<div><h3>Against the ground truth</h3><table>{rows}</table></div>"
    plot = f'<div><img src="{plot_file}" alt="decisions per given class" class="plot"></div>' if plot_file else ""

    flagged_classes = [c for c in range(num_classes) if counts["relabelled"][c] or counts["ood"][c]]
    sections = []
    for c in flagged_classes:
        parts = []
        for name, title, note in (
            ("relabelled", "relabelled", "given &rarr; suggested, lowest label quality first"),
            ("ood", "out of distribution", "highest OOD score first"),
        ):
            total, figures = int(counts[name][c]), shown.get((c, name), [])
            if not total:
                continue
            parts.append(
                f'<section class="{name}"><h3>{title}: {total} <span class="muted">(showing {len(figures)}; '
                f"{note})</span></h3>"
                f'<div class="grid">{"".join(figures)}</div></section>'
            )
        sections.append(
            f'<div class="class" id="class-{c}" data-label="{c}" data-samples="{int(counts["samples"][c])}" '
            f'data-relabelled="{int(counts["relabelled"][c])}" data-ood="{int(counts["ood"][c])}" '
            f'data-shown="{sum(len(shown.get((c, n), [])) for n in RANKING)}">'
            f'<h2>{c} &middot; {html.escape(class_names[c])} <span class="muted">({int(counts["samples"][c])} '
            f"samples: {int(counts['relabelled'][c])} relabelled, {int(counts['ood'][c])} OOD)</span></h2>"
            + "".join(parts)
            + "</div>"
        )
    index_rows = "\n".join(
        f'<tr><td><a href="#class-{c}">{c} &middot; {html.escape(class_names[c])}</a></td>'
        f'<td class="n">{int(counts["samples"][c])}</td><td class="n">{int(counts["relabelled"][c])}</td>'
        f'<td class="n">{int(counts["ood"][c])}</td></tr>'
        for c in flagged_classes
    )
    unflagged = num_classes - len(flagged_classes)
    data = html.escape(data_description or "a dataset")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>MoPro noise report of {data}</title>
<style>{_STYLE}</style></head>
<body>
<h1>MoPro noise report of {data}</h1>
<p>{int(summary["num_samples"])} samples scored by {_code_spans(scorer)}. Per given class below: the images MoPro
relabelled (given &rarr; suggested) and the ones it found out of distribution, at most {per_class} of each per class,
as {thumbnail_size}-px thumbnails ({len(flagged)} images shown). The full per-sample table is the report dataset;
these images are also its <code>{FLAGGED_CONFIG}</code> configuration.</p>
{f'<p class="warning"><b>Warning:</b> {_code_spans(summary["warning"][:1].upper() + summary["warning"][1:])}</p>' if summary.get("warning") else ""}
<div class="layout"><div><h3>Decisions</h3><table><tr><th>decision</th><th>samples</th><th>share</th></tr>
{decision_rows}</table>
<h3>Classes with flagged samples ({len(flagged_classes)} of {num_classes}{f"; {unflagged} with none are not shown" if unflagged else ""})</h3>
<table><tr><th>class</th><th>samples</th><th>relabelled</th><th>OOD</th></tr>
{index_rows}</table></div>{truth_table}{plot}</div>
{"".join(sections)}
</body></html>
"""
    path = output_dir / GALLERY_FILE
    path.write_text(page, encoding="utf-8")
    return path


def _code_spans(text: str) -> str:
    """Markdown-style `code` spans (as the card writes the model's name) as HTML, the rest escaped."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{part}</code>" if i % 2 else part for i, part in enumerate(parts))


def _undecoded():
    import datasets

    return datasets.Image(decode=False)


def folder_size(paths: Sequence[Path]) -> int:
    """Bytes of the files under `paths` (folders walked, files counted as they are)."""
    total = 0
    for path in paths:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        total += sum(p.stat().st_size for p in files)
    return total


__all__ = [
    "DEFAULT_PER_CLASS",
    "DEFAULT_THUMBNAIL_SIZE",
    "FLAGGED_CONFIG",
    "GALLERY_FILE",
    "THUMBNAIL_DIR",
    "flagged_images_dataset",
    "flagged_rows",
    "folder_size",
    "thumbnail",
    "write_gallery",
]
