"""The noise report's images: the `flagged_images` configuration (thumbnails of exactly the flagged samples, bounded
per class), the offline gallery page, and cards that name the scoring model without a path of this machine."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from evaluation import gallery, noise_report
from tests.fixtures_eval import noisy_hf_dataset
from tests.test_noise_report import save_noise_model

REPORT_COLUMNS = ("id", "given_label", "suggested_label", "decision", "label_quality", "ood_score", "true_label")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A report (training rule: clean, relabelled and OOD samples all occur) with every flagged sample's image."""
    root = tmp_path_factory.mktemp("images")
    data = noisy_hf_dataset(num_samples=32)
    model_dir = save_noise_model(root / "model", data)
    out = root / "report"
    options = noise_report.NoiseReportOptions(
        batch_size=16, num_workers=0, decision_rule="training", flagged_images_per_class=32, thumbnail_size=24
    )
    summary = noise_report.write_noise_report(model_dir, data, out, options)
    return data, out, summary, model_dir


def rows_by_id(dataset) -> dict[str, dict]:
    return {row["id"]: {k: row[k] for k in REPORT_COLUMNS} for row in dataset.remove_columns(
        [c for c in dataset.column_names if c not in REPORT_COLUMNS])}  # fmt: skip


def test_flagged_images_configuration_holds_exactly_the_flagged_samples(written):
    data, out, summary, _ = written
    report = datasets.load_from_disk(str(out))
    assert "image" not in report.column_names  # the full table stays image-free
    flagged = datasets.load_from_disk(str(out / gallery.FLAGGED_CONFIG))
    assert isinstance(flagged.features["image"], datasets.Image) and flagged.column_names[0] == "image"
    expected = [row for row in rows_by_id(report).values() if row["decision"] != "clean"]
    assert {"relabelled", "ood"} <= {row["decision"] for row in expected}
    # The bound (32 per class and decision) exceeds every count: every flagged sample, each once, with its row.
    assert len(flagged) == len(expected) == summary["num_relabelled"] + summary["num_ood"]
    assert rows_by_id(flagged) == {row["id"]: row for row in expected}
    assert flagged.features["given_label"].names == report.features["given_label"].names
    # Each image is the sample's own (nearer to it than to any other sample's image, shrunk alike), at most 24 px a
    # side with its aspect ratio kept.
    source = dict(zip(data["path"], data["image"], strict=True))
    for row in flagged:
        original, thumb = source[row["id"]], row["image"]
        assert max(thumb.size) == 24 and thumb.format == "JPEG"
        assert abs(thumb.size[0] / thumb.size[1] - original.size[0] / original.size[1]) < 0.1
        pixels = np.asarray(thumb.convert("RGB"), float)
        distance = {
            path: np.abs(pixels - np.asarray(image.convert("RGB").resize(thumb.size, Image.Resampling.LANCZOS))).mean()
            for path, image in source.items()
            if image.size == original.size
        }
        assert min(distance, key=distance.get) == row["id"]


def test_flagged_images_load_as_the_hub_configuration(written, tmp_path):
    """The pushed layout (parquet where `Dataset.push_to_hub` writes each configuration, the pushed card):
    `load_dataset(repo, "flagged_images")` gives the flagged rows, the default configuration the image-free table."""
    _, out, _, _ = written
    repo = tmp_path / "repo"
    report = datasets.load_from_disk(str(out))
    flagged = datasets.load_from_disk(str(out / gallery.FLAGGED_CONFIG))
    (repo / "data").mkdir(parents=True)
    (repo / gallery.FLAGGED_CONFIG).mkdir()
    report.to_parquet(str(repo / "data" / "train-00000-of-00001.parquet"))
    flagged.to_parquet(str(repo / gallery.FLAGGED_CONFIG / "train-00000-of-00001.parquet"))
    (repo / "README.md").write_text(noise_report.hub_card((out / "README.md").read_text(), "org/model")[0])
    # A cache of its own: the shared one keys a local folder by its path, which pytest reuses across sessions, and would
    # hand back the tables of an earlier session's report.
    cache = str(tmp_path / "datasets_cache")
    loaded = datasets.load_dataset(str(repo), gallery.FLAGGED_CONFIG, split="train", cache_dir=cache)
    assert isinstance(loaded.features["image"], datasets.Image)
    assert rows_by_id(loaded) == rows_by_id(flagged)
    assert [image.tobytes() for image in loaded["image"]] == [image.tobytes() for image in flagged["image"]]
    default = datasets.load_dataset(str(repo), split="train", cache_dir=cache)
    assert "image" not in default.column_names and len(default) == len(report)


def test_top_n_per_class_by_score(written, tmp_path):
    data, _, _, model_dir = written
    out = tmp_path / "report"
    options = noise_report.NoiseReportOptions(
        batch_size=16, num_workers=0, decision_rule="training", flagged_images_per_class=1
    )
    noise_report.write_noise_report(model_dir, data, out, options)
    report = datasets.load_from_disk(str(out))
    flagged = datasets.load_from_disk(str(out / gallery.FLAGGED_CONFIG))
    given, decision = np.asarray(report["given_label"]), np.asarray(report["decision"])
    quality, ood = np.asarray(report["label_quality"]), np.asarray(report["ood_score"])
    expected = []
    for label in sorted(set(given.tolist())):
        relabelled = np.flatnonzero((given == label) & (decision == "relabelled"))
        dropped = np.flatnonzero((given == label) & (decision == "ood"))
        expected += [report["id"][i] for i in relabelled[np.argsort(quality[relabelled], kind="stable")][:1]]
        expected += [report["id"][i] for i in dropped[np.argsort(-ood[dropped], kind="stable")][:1]]
    assert flagged["id"] == expected and len(expected) < (decision != "clean").sum()
    page = (out / gallery.GALLERY_FILE).read_text()
    assert len(re.findall(r"<img src=\"gallery/", page)) == len(flagged)


def test_no_images_when_asked(written, tmp_path, capsys):
    data, _, _, model_dir = written
    out = tmp_path / "report"
    options = noise_report.NoiseReportOptions(batch_size=16, num_workers=0, flagged_images_per_class=0)
    noise_report.write_noise_report(model_dir, data, out, options)
    assert not (out / gallery.FLAGGED_CONFIG).exists() and not (out / gallery.GALLERY_FILE).exists()
    assert "configs" not in (out / "README.md").read_text()
    # Bad bounds: a one-line error before any scoring (exit 2), as every flag of the command.
    from modeling_mopro.cli import run_command

    for flag, value in (("--flagged_images_per_class", "-1"), ("--thumbnail_size", "0")):
        with pytest.raises(SystemExit) as exit_info:
            run_command(noise_report.main, ["--model_name_or_path", str(model_dir), "--data_dir", "x", flag, value])
        assert exit_info.value.code == 2 and flag in capsys.readouterr().err


def test_sizes_are_printed(written, tmp_path, capsys):
    data, _, _, model_dir = written
    out = tmp_path / "report"
    options = noise_report.NoiseReportOptions(batch_size=16, num_workers=0, decision_rule="training")
    noise_report.write_noise_report(model_dir, data, out, options)
    printed = capsys.readouterr().out
    size = gallery.folder_size([out / gallery.FLAGGED_CONFIG, out / gallery.THUMBNAIL_DIR, out / gallery.GALLERY_FILE])
    assert f"{size / 1e6:.2f} MB" in printed and "12 OOD per class, 96-px JPEG thumbnails" in printed


# --- cards that travel ------------------------------------------------------------------------------------------------
def test_local_card_names_the_model_by_absolute_path_and_the_pushed_card_never(written, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    from evaluation import release

    data, _, _, model_dir = written
    monkeypatch.chdir(model_dir.parent)
    out = tmp_path / "report"
    # A relative model folder, as run_mopro passes its --output_dir.
    options = noise_report.NoiseReportOptions(batch_size=16, num_workers=0, flagged_images_per_class=2)
    noise_report.write_noise_report(model_dir.name, data, out, options)
    local = (out / "README.md").read_text()
    assert f"Scored by the MoPro model `{model_dir.resolve()}`." in local
    assert f"<code>{model_dir.resolve()}</code>" in (out / gallery.GALLERY_FILE).read_text()  # the page too

    monkeypatch.setattr(release, "check_hub_reachable", lambda **kwargs: None)
    monkeypatch.setattr(release, "check_hub_login", lambda **kwargs: None)
    pushed, configs = {}, []
    monkeypatch.setattr(datasets.Dataset, "push_to_hub", lambda self, repo, **kw: configs.append(
        (kw.get("config_name", "default"), len(self), "image" in self.column_names)))  # fmt: skip

    def upload_file(self, path_or_fileobj, path_in_repo, **kwargs):
        data = path_or_fileobj if isinstance(path_or_fileobj, bytes) else Path(path_or_fileobj).read_bytes()
        pushed[path_in_repo] = data

    monkeypatch.setattr(HfApi, "upload_file", upload_file)
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: pushed.setdefault(kw["path_in_repo"] + "/", b""))
    for model_repo_id, named in (("org/web-model", "`org/web-model`"), (None, f"`{model_dir.name}`")):
        pushed.clear()
        noise_report.push_noise_report(out, "org/web-noise", model_repo_id=model_repo_id)
        card, page = pushed["README.md"].decode(), pushed[gallery.GALLERY_FILE].decode()
        assert f"Scored by the MoPro model {named}." in card
        assert f"scored by the MoPro model <code>{named.strip('`')}</code>." in page
        for text in (card, page):
            assert str(model_dir.resolve()) not in text and str(tmp_path) not in text
    assert configs[:2] == [("default", 32, False), (gallery.FLAGGED_CONFIG, len(datasets.load_from_disk(
        str(out / gallery.FLAGGED_CONFIG))), True)]  # fmt: skip
    assert {"index.html", "gallery/", "noise_report.png"} <= set(pushed)


# --- the gallery in a real browser --------------------------------------------------------------------------------------
def find_browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


# Runs first in <head>: records script errors and failed resource loads, then, once everything has loaded, every
# image's natural width and the page's counts, as JSON in the DOM that --dump-dom prints.
PROBE = """<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push(String(e.message || (e.target && e.target.src))), true);
window.addEventListener("load", () => {
  const images = [...document.querySelectorAll("img")].map(i => [i.getAttribute("src"), i.naturalWidth]);
  const classes = [...document.querySelectorAll("div.class")].map(d => ({
    label: +d.dataset.label, relabelled: +d.dataset.relabelled, ood: +d.dataset.ood, shown: +d.dataset.shown,
    figures: d.querySelectorAll("figure").length}));
  const totals = Object.fromEntries(["clean", "relabelled", "ood"].map(
    n => [n, +document.getElementById("num-" + n).textContent]));
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({errors: window.__errors, images, classes, totals});
  document.body.appendChild(out);
});
</script>"""


def render(browser: str, page: Path) -> dict:
    probed = page.with_name("probe.html")  # beside the page: the thumbnails' relative links resolve the same
    probed.write_text(page.read_text().replace("<head>", "<head>" + PROBE, 1))
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
         "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(page.parent)},
    )  # fmt: skip
    match = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, re.S)
    assert match, f"the page did not finish loading: {result.stderr[-2000:]}"
    import html

    return json.loads(html.unescape(match.group(1)))


def test_gallery_renders_in_a_browser(written, tmp_path):
    browser = find_browser()
    if browser is None:
        pytest.skip("no chromium: `apt-get install -y chromium` (CI installs it) to run the gallery's browser test")
    _, out, summary, _ = written
    page_dir = tmp_path / "report"
    shutil.copytree(out, page_dir)  # moved elsewhere: relative links only
    report = datasets.load_from_disk(str(page_dir))
    flagged = datasets.load_from_disk(str(page_dir / gallery.FLAGGED_CONFIG))
    seen = render(browser, page_dir / gallery.GALLERY_FILE)
    assert seen["errors"] == []
    thumbs = [src for src, _ in seen["images"] if src.startswith(gallery.THUMBNAIL_DIR)]
    assert len(thumbs) == len(flagged) > 0 and "noise_report.png" in [src for src, _ in seen["images"]]
    assert all(width > 0 for _, width in seen["images"]), seen["images"]
    assert seen["totals"] == {name: summary[f"num_{name}"] for name in ("clean", "relabelled", "ood")}
    given, decision = np.asarray(report["given_label"]), np.asarray(report["decision"])
    expected = {
        int(c): (
            int(((given == c) & (decision == "relabelled")).sum()),
            int(((given == c) & (decision == "ood")).sum()),
        )
        for c in np.unique(given[decision != "clean"])
    }
    assert {c["label"]: (c["relabelled"], c["ood"]) for c in seen["classes"]} == expected
    assert all(c["shown"] == c["figures"] for c in seen["classes"])
    assert sum(c["figures"] for c in seen["classes"]) == len(flagged)

    # The probe sees a broken thumbnail: the checks above can fail.
    (page_dir / gallery.THUMBNAIL_DIR / "000000.jpg").unlink()
    broken = render(browser, page_dir / gallery.GALLERY_FILE)
    assert [src for src, width in broken["images"] if width == 0] == [f"{gallery.THUMBNAIL_DIR}/000000.jpg"]
    assert broken["errors"]
