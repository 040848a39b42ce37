"""A results browser: one static HTML page per evaluated run, opened from disk (no server, no network).

``detkit-report RUN`` (and ``detkit-eval ... report=true``, ``detkit-train``) writes ``RUN/report.html`` beside
the run's ``metrics.json`` and plots, and ``RUN/report/thumbs/*.jpg``. The page holds:

* the COCO statistics and the per-class table (AP, AP50, precision, recall, F1 at the best-F1 confidence),
* the PR, precision/recall/F1-against-confidence and confusion-matrix plots (the run's PNGs, referenced),
* a gallery of the evaluated images, ground truth drawn dashed, predictions solid with their scores, sortable by
  per-image error and filterable by class and by a score slider; clicking a thumbnail opens the full image (the
  original file, referenced by a relative path, never copied).

Per-image errors are recomputed in the page for the slider's score threshold, with the matching of
:func:`detkit.eval.report.confusion_matrix` restricted to one class at a time (greedy by score, IoU >= 0.5):
*missed* ground truth, *false* detections, and *low-IoU* matches (matched with IoU < 0.75). The filter state lives
in the URL hash (``#class=RBC&score=0.3&sort=missed``), so a view can be bookmarked and tested.

Category and file names come from the dataset and may be hostile (``</script>``, ``<img onerror=...>``): they reach
the page HTML-escaped (the per-class table) or inside the embedded JSON, whose ``<``, ``>`` and ``&`` are escaped,
and the script puts them into the DOM as text and attribute values only. A Content-Security-Policy (:data:`CSP`)
lets only the page's own script and style run (by their SHA-256) and images load from the page's folder tree.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

THUMB_SIDE = 256


def _thumbnail(src: Path, dst: Path) -> tuple[int, int]:
    """Write a JPEG thumbnail of ``src`` (longer side :data:`THUMB_SIDE`); returns the original ``(w, h)``."""
    import cv2

    from detkit.data.image_files import READ_FLAGS

    image = cv2.imread(str(src), READ_FLAGS)  # detkit's reading policy: stored pixels, EXIF orientation ignored
    if image is None:
        raise FileNotFoundError(f"report: cannot read image {src}")
    h, w = image.shape[:2]
    scale = THUMB_SIDE / max(h, w)
    if scale < 1:
        image = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    dst.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(dst), image, [cv2.IMWRITE_JPEG_QUALITY, 80])
    return w, h


def _safe_image_path(root: Path, file_name: str) -> Path:
    path = (root / file_name).resolve()
    if not path.is_relative_to(root.resolve()):
        raise ValueError(f"report: image file name {file_name!r} leaves the image root {root}")
    return path


def build_report(out_dir: Path, gt: dict, results: Sequence[dict], image_root: Path, metrics: dict,
                 title: str = "detkit evaluation", min_score: float = 0.05) -> Path:
    """Write ``out_dir/report.html`` (+ ``out_dir/report/thumbs``) for COCO ``gt`` and ``results`` (xywh, original
    pixels) whose images are under ``image_root``; ``metrics`` is the run's metrics.json. Predictions below
    ``min_score`` are left out of the page (the slider starts at the best-F1 confidence)."""
    out_dir = Path(out_dir)
    thumbs = out_dir / "report" / "thumbs"
    by_image_gt: dict = {}
    for a in gt["annotations"]:
        by_image_gt.setdefault(a["image_id"], []).append(
            [*(round(float(v), 1) for v in a["bbox"]), a["category_id"], int(a.get("iscrowd", 0))])
    by_image_dt: dict = {}
    for r in results:
        if r["score"] >= min_score:
            by_image_dt.setdefault(r["image_id"], []).append(
                [*(round(float(v), 1) for v in r["bbox"]), r["category_id"], round(float(r["score"]), 4)])
    images = []
    for im in gt["images"]:
        src = _safe_image_path(image_root, im["file_name"])
        thumb = thumbs / f"{im['id']}.jpg"
        w, h = _thumbnail(src, thumb)
        images.append({"id": im["id"], "file": im["file_name"], "w": w, "h": h,
                       "thumb": os.path.relpath(thumb, out_dir), "full": os.path.relpath(src, out_dir),
                       "gt": by_image_gt.get(im["id"], []),
                       "dt": sorted(by_image_dt.get(im["id"], []), key=lambda d: -d[5])})
    report = metrics.get("report", {})
    data = {"title": title, "categories": [{"id": c["id"], "name": c["name"]} for c in gt["categories"]],
            "images": images, "best_confidence": report.get("best_f1_confidence", 0.3)}
    stats = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    plots = [p for p in ("pr_curves.png", "f1_curves.png", "confusion_matrix.png") if (out_dir / p).is_file()]
    page = _page({"CSP": CSP, "TITLE": html.escape(title), "STYLE": _STYLE, "SCRIPT": _SCRIPT,
                  "STATS": _stats_table(stats), "PER_CLASS": _per_class_table(metrics.get("per_class", [])),
                  "SELF_TRAINING": _self_training_table(metrics.get("self_training")),
                  "PLOTS": "".join(f'<a href="{p}"><img class="plot" src="{p}" alt="{p}"></a>' for p in plots),
                  "DATA": _json_for_html(data)})
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def _fmt(v) -> str:
    return "—" if v is None or (isinstance(v, float) and (v < 0 or not np.isfinite(v))) else f"{v:.3f}" \
        if isinstance(v, float) else html.escape(str(v))


def _stats_table(stats: dict) -> str:
    keys = [k for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
            if k in stats]
    return ("<table><tr>" + "".join(f"<th>{k}</th>" for k in keys) + "</tr><tr>"
            + "".join(f"<td>{_fmt(float(stats[k]))}</td>" for k in keys) + "</tr></table>")


def _per_class_table(rows: list[dict]) -> str:
    cols = ["AP", "AP50", "precision", "recall", "F1"]
    body = "".join("<tr><td>" + html.escape(str(r.get("name", r.get("id")))) + "</td>"
                   + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
    return "<table><tr><th>class</th>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>" + body + "</table>"


def _self_training_table(info: dict | None) -> str:
    """Self-training's record per epoch (``metrics.json`` ``self_training``): pseudo-labels used, and their
    precision and recall when the unlabeled images had labels; nothing for a run without self-training."""
    if not info:
        return ""
    cols = ["unlabeled_images", "pseudo_labels", "pseudo_labels_per_image", "precision", "recall", "other_class"]
    body = "".join("<tr><td>" + html.escape(str(e.get("epoch"))) + "</td>"
                   + "".join(f"<td>{_fmt(e.get(c))}</td>" for c in cols) + "</tr>" for e in info.get("epochs", []))
    head = "".join(f"<th>{c.replace('_', ' ')}</th>" for c in cols)
    if info.get("unit") == "cells":  # semi.pseudo_labels=dense: no threshold; counts and precision are per cell
        how = " per class, by each class's score" if info.get("dense_per_class") else ""
        note = (f"burn-in {info.get('burn_in_steps')} steps, dense pseudo-labels: the teacher's outputs at the cells "
                f"it ranks foreground{how}; counts are cells, precision the share of those cells lying inside a box "
                f"of the class they are taught as (no recall)")
    else:
        above = (f"{info.get('score_threshold')} for the most confident class, class-wise thresholds adapted to the "
                 f"teacher's scores" if info.get("adaptive_threshold") else f"{info.get('score_threshold')}")
        soft = (", background RoIs weighted by the teacher's background probability" if info.get("soft_background")
                else "")
        note = (f"burn-in {info.get('burn_in_steps')} steps, pseudo-labels above {above}{soft}, "
                f"precision at IoU {info.get('precision_iou')}")
    per_class = ""
    if info.get("per_class"):  # the run's totals per class (category names come from the dataset: escaped)
        pcols = ["pseudo_labels", "precision", "recall", "other_class"]
        if any("last_threshold" in r for r in info["per_class"]):
            pcols.append("last_threshold")
        rows = "".join("<tr><td>" + html.escape(str(r.get("name"))) + "</td>"
                       + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in pcols) + "</tr>" for r in info["per_class"])
        per_class = ("<h3>Per class, whole run</h3><table><tr><th>class</th>"
                     + "".join(f"<th>{c.replace('_', ' ')}</th>" for c in pcols) + f"</tr>{rows}</table>")
    return (f"<h2>Self-training: pseudo-labels per epoch</h2><p>{html.escape(note)}; other class: the share "
            f"lying on an object of another class</p><table><tr><th>epoch</th>{head}</tr>{body}</table>{per_class}")


def _json_for_html(value: object) -> str:
    """``value`` as JSON that is inert inside HTML: ``<``, ``>`` and ``&`` as ``\\u003c``, ``\\u003e`` and
    ``\\u0026`` (JSON.parse reads them back), so no string in it can close its ``<script>`` or open markup."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _sha256(text: str) -> str:
    """A CSP hash source for an inline ``<script>`` or ``<style>`` whose content is exactly ``text``."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


_STYLE = r"""
body{font-family:system-ui,sans-serif;margin:16px;color:#222}
table{border-collapse:collapse;margin:8px 0}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}
.plot{height:260px;margin:4px;border:1px solid #ddd}
#controls{position:sticky;top:0;background:#fff;padding:8px 0;border-bottom:1px solid #ddd;z-index:2}
#gallery{display:flex;flex-wrap:wrap;gap:8px;margin-top:8px}
.tile{border:1px solid #ccc;padding:4px;cursor:pointer;font-size:12px;width:264px}
.tile .frame{position:relative;width:256px;height:256px}
.tile img,.big img{display:block}
svg{position:absolute;left:0;top:0;pointer-events:none}
#svgns{display:none}
#modal{display:none;position:fixed;inset:0;background:rgba(0,0,0,.8);z-index:5;overflow:auto}
#modal .big{position:relative;margin:20px auto;background:#fff;padding:8px;width:max-content}
#modal .bigframe{position:relative}
.legend span{margin-right:12px}
"""

# Every name and file name from the dataset reaches the DOM as text (textContent, attribute values), never as markup.
_SCRIPT = r"""
const DATA = JSON.parse(document.getElementById('data').textContent);
const SVG_NS = document.getElementById('svgns').namespaceURI;
const NAMES = {}; DATA.categories.forEach(c => NAMES[c.id] = c.name);
const COLORS = ['#e6194b','#3cb44b','#4363d8','#f58231','#911eb4','#42d4f4','#f032e6','#bfef45','#469990','#9a6324'];
const colorOf = {}; DATA.categories.forEach((c, i) => colorOf[c.id] = COLORS[i % COLORS.length]);
const cls = document.getElementById('cls'), score = document.getElementById('score'), sortSel = document.getElementById('sort');
DATA.categories.forEach(c => { const o = document.createElement('option'); o.value = c.name; o.textContent = c.name; cls.appendChild(o); });

function node(ns, tag, attrs, text) {  // an element with attribute values and text, never parsed as markup
  const e = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  return e;
}
function fileUrl(path) { return path.split('/').map(encodeURIComponent).join('/'); }  // a relative path as a URL
function iou(a, b) {  // xywh
  const iw = Math.max(0, Math.min(a[0] + a[2], b[0] + b[2]) - Math.max(a[0], b[0]));
  const ih = Math.max(0, Math.min(a[1] + a[3], b[1] + b[3]) - Math.max(a[1], b[1]));
  const inter = iw * ih, union = a[2] * a[3] + b[2] * b[3] - inter;
  return union > 0 ? inter / union : 0;
}
function crowdOverlap(d, g) {  // COCOeval's IoU against a crowd region: intersection over the detection's area
  const iw = Math.max(0, Math.min(d[0] + d[2], g[0] + g[2]) - Math.max(d[0], g[0]));
  const ih = Math.max(0, Math.min(d[1] + d[3], g[1] + g[3]) - Math.max(d[1], g[1]));
  return d[2] * d[3] > 0 ? iw * ih / (d[2] * d[3]) : 0;
}
function errors(im, thr) {  // greedy by score within each class, IoU >= 0.5; a class's crowd regions absorb its detections
  const dts = im.dt.filter(d => d[5] >= thr), used = new Set();
  let fp = 0, low = 0;
  for (const d of dts) {
    let best = -1, bestIou = 0.5;
    im.gt.forEach((g, j) => { if (!g[5] && !used.has(j) && g[4] === d[4]) { const v = iou(d, g); if (v >= bestIou) { best = j; bestIou = v; } } });
    if (best >= 0) { used.add(best); if (bestIou < 0.75) low++; }
    else if (!im.gt.some(g => g[5] && g[4] === d[4] && crowdOverlap(d, g) >= 0.5)) fp++;
  }
  const missed = im.gt.filter((g, j) => !g[5] && !used.has(j)).length;
  return {missed: missed, false: fp, lowiou: low, errors: missed + fp + low};
}
function boxesSvg(im, w, h, thr) {
  const s = w / im.w, svg = node(SVG_NS, 'svg', {width: w, height: h});
  for (const g of im.gt) svg.appendChild(node(SVG_NS, 'rect', {x: g[0]*s, y: g[1]*s, width: g[2]*s, height: g[3]*s,
    fill: 'none', stroke: colorOf[g[4]], 'stroke-width': 2, 'stroke-dasharray': '5,3'}));
  for (const d of im.dt) if (d[5] >= thr) {
    svg.appendChild(node(SVG_NS, 'rect', {x: d[0]*s, y: d[1]*s, width: d[2]*s, height: d[3]*s, fill: 'none',
      stroke: colorOf[d[4]], 'stroke-width': 2}));
    svg.appendChild(node(SVG_NS, 'text', {x: d[0]*s + 2, y: d[1]*s + 11, 'font-size': 11, fill: colorOf[d[4]]},
      `${NAMES[d[4]]} ${d[5].toFixed(2)}`));
  }
  return svg;
}
function readHash() {
  const p = new URLSearchParams(location.hash.slice(1));
  cls.value = p.get('class') || ''; sortSel.value = p.get('sort') || 'errors';
  score.value = p.has('score') ? p.get('score') : DATA.best_confidence.toFixed(2);
}
function writeHash() {
  const p = new URLSearchParams(); if (cls.value) p.set('class', cls.value);
  p.set('score', score.value); p.set('sort', sortSel.value); history.replaceState(null, '', '#' + p.toString());
}
function render() {
  const thr = parseFloat(score.value), name = cls.value;
  document.getElementById('scoreval').textContent = thr.toFixed(2);
  const cat = name ? DATA.categories.find(c => c.name === name) : null, catId = cat ? cat.id : null;
  let rows = DATA.images.map(im => ({im: im, e: errors(im, thr)}));
  if (catId !== null) rows = rows.filter(r => r.im.gt.some(g => g[4] === catId) || r.im.dt.some(d => d[4] === catId && d[5] >= thr));
  const key = sortSel.value;
  rows.sort((a, b) => key === 'id' ? a.im.id - b.im.id : (b.e[key] - a.e[key]) || (a.im.id - b.im.id));
  const gallery = document.getElementById('gallery'); gallery.replaceChildren();
  for (const r of rows) {
    const s = 256 / Math.max(r.im.w, r.im.h), w = Math.round(r.im.w * s), h = Math.round(r.im.h * s);
    const tile = document.createElement('div'); tile.className = 'tile'; tile.dataset.imageId = r.im.id;
    const frame = node(null, 'div', {class: 'frame'});
    frame.append(node(null, 'img', {src: fileUrl(r.im.thumb), width: w, height: h, loading: 'lazy'}), boxesSvg(r.im, w, h, thr));
    tile.append(frame, node(null, 'span', {class: 'file'}, r.im.file), node(null, 'br'),
      `missed ${r.e.missed} · false ${r.e.false} · low IoU ${r.e.lowiou}`);
    tile.onclick = () => openBig(r.im, thr);
    gallery.appendChild(tile);
  }
  document.getElementById('count').textContent = `${rows.length} of ${DATA.images.length} images`;
  document.getElementById('count').dataset.shown = rows.length;
}
function openBig(im, thr) {
  const w = Math.min(im.w, window.innerWidth - 80), h = Math.round(im.h * w / im.w);
  const frame = node(null, 'div', {class: 'bigframe'});
  frame.append(node(null, 'img', {src: fileUrl(im.full), width: w, height: h}), boxesSvg(im, w, h, thr));
  document.getElementById('big').replaceChildren(frame, node(null, 'p', {}, `${im.file} (click to close)`));
  document.getElementById('modal').style.display = 'block';
}
document.getElementById('modal').onclick = () => document.getElementById('modal').style.display = 'none';
[cls, score, sortSel].forEach(el => el.addEventListener('input', () => { writeHash(); render(); }));
window.addEventListener('hashchange', () => { readHash(); render(); });
readHash(); render();
"""

#: What the page may load: its own style and script (by hash), images from its own folder tree (the thumbnails,
#: plots and originals, by relative path) and data: URLs; nothing else, and no other script, inline or not.
CSP = (f"default-src 'none'; script-src {_sha256(_SCRIPT)}; style-src {_sha256(_STYLE)}; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'")

_PAGE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="__CSP__">
<title>__TITLE__</title>
<style>__STYLE__</style></head>
<body>
<h1>__TITLE__</h1>
<h2>COCO metrics</h2>__STATS__
<h2>Per class (precision, recall, F1 at the best-F1 confidence)</h2>__PER_CLASS__
__SELF_TRAINING__
<h2>Curves</h2><div>__PLOTS__</div>
<h2>Images</h2>
<div id="controls">
 class <select id="cls"><option value="">all classes</option></select>
 score &ge; <input id="score" type="range" min="0" max="1" step="0.01"> <span id="scoreval"></span>
 sort by <select id="sort"><option value="errors">errors (missed + false + low IoU)</option>
 <option value="missed">missed objects</option><option value="false">false detections</option>
 <option value="lowiou">low-IoU matches</option><option value="id">image id</option></select>
 <span id="count"></span>
 <div class="legend"><span>&#9476; ground truth (dashed)</span><span>&#9472; prediction (solid, score)</span></div>
</div>
<div id="gallery"></div>
<div id="modal"><div class="big" id="big"></div></div>
<svg id="svgns"></svg>
<script id="data" type="application/json">__DATA__</script>
<script>__SCRIPT__</script></body></html>
"""


def _page(parts: dict[str, str]) -> str:
    """:data:`_PAGE` with each ``__KEY__`` replaced by ``parts[KEY]`` in one pass (inserted text is never rescanned,
    so a name that reads like a placeholder stays text)."""
    return re.sub(r"__([A-Z_]+?)__", lambda m: parts[m.group(1)], _PAGE)
