"""Image files as detkit reads them: one reading policy, and the check that folders of images get before any work.

**Reading policy** (every reader follows it: data loading, prediction and its drawings, the results browser's
thumbnails, and the exported model's expected input). An image is decoded to ``uint8 [H, W, 3]`` RGB in its
*stored* pixel order, **ignoring EXIF orientation**: COCO annotations (and pycocotools, torchvision and labelling
tools' exports) give boxes and ``width``/``height`` in the stored pixels, so applying the rotation would move the
picture away from its boxes. Grayscale, grayscale+alpha, RGBA (alpha dropped, not composited), palette, 1-bit and
16-bit files (scaled to 8 bits) all load as RGB ``uint8``. :func:`read_rgb` is the reader; :data:`READ_FLAGS` are
its OpenCV flags for code that must call ``cv2.imread`` itself.

**Folder check** (:func:`check_image_folder`, :func:`check_image_files`), the unlabeled counterpart of the labeled
check in :mod:`detkit.data.validate`, run by ``detkit-pretrain`` (and its kNN monitor folders) and
``detkit-predict`` before any work:

* files are listed recursively; files without an image suffix (:data:`IMAGE_SUFFIXES`) are counted and ignored by
  name, never opened; names are never passed to a shell, and nothing that resolves outside the folder the user named
  is opened (symbolic links leading out are reported, symbolic links to folders are not followed);
* every image file is opened and decoded (JPEGs at 1/8 scale, which still reads every byte, so truncated files are
  caught), in parallel threads (PIL releases the GIL while decoding), like the labeled check does;
* results are cached per folder (a json under ``$DETKIT_CACHE_DIR``, default ``~/.cache/detkit``, keyed by the
  folder's resolved path, one entry per file with its size and modification time), so a second run over the same
  100,000 images only stats them;
* unreadable files are listed once, by name with the reason, and skipped (``skip_invalid=True``, the default for
  unlabeled images and prediction) or the folder is refused with that list (``skip_invalid=False``). An empty
  folder, or one where nothing decodes, is a one-line error naming the folder.

A file that becomes unreadable *during* a run (deleted, replaced) is handled by the datasets: see
:func:`read_rgb_or_substitute`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from PIL import Image

from detkit.data.convert import IMAGE_SUFFIXES
from detkit.data.validate import UnusableInputError, resolve_image_path

log = logging.getLogger(__name__)

#: OpenCV flags of the reading policy: 8-bit, 3 channels (BGR), EXIF orientation ignored (boxes are in the stored
#: pixels).
READ_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION

#: Threads that decode images during the check (as :func:`detkit.data.validate.validate_coco`'s default).
CHECK_WORKERS = 8

#: Bump when :func:`probe_image` changes, so cached verdicts of an older check are not reused.
CHECK_VERSION = 1

#: Unreadable files listed in the log (all of them go into the run's output file).
MAX_LOGGED = 20


class ImageFolderError(UnusableInputError):
    """A folder of images cannot be used: nothing in it decodes, or it holds unreadable files and
    ``skip_invalid=False``. ``str(error)`` names the folder (and the files, with the reasons). An
    :class:`~detkit.data.validate.UnusableInputError`, so the entry points report it as one message."""


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file to ``uint8 [H, W, 3]`` RGB by the reading policy (stored pixels, EXIF orientation
    ignored; any pixel format to 8-bit RGB). Raises ``OSError`` naming the file if it cannot be decoded."""
    image = cv2.imread(str(path), READ_FLAGS)
    if image is None:
        raise OSError(f"cannot decode image file {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def probe_image(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    """Open and decode ``path``: ``((width, height), None)`` if it is a readable image, else ``(None, reason)``.

    JPEGs decode at a reduced scale (``draft``): all of the file is still read, so a truncated or corrupt file
    fails as it does at full size, at a fraction of the cost."""
    size, reason, _ = _probe(path)
    return size, reason


def _probe(path: Path) -> tuple[tuple[int, int] | None, str | None, bool]:
    """:func:`probe_image` plus whether the verdict may be cached: a failure of the file system (permission,
    I/O error: an ``OSError`` with an ``errno``) says nothing lasting about the file's contents."""
    try:
        with Image.open(path) as im:
            size = im.size
            if im.format == "JPEG":
                im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            im.load()
            mode = im.mode
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        transient = isinstance(e, OSError) and e.errno is not None
        return None, f"not a readable image ({e})", not transient
    if size[0] <= 0 or size[1] <= 0:
        return None, f"image has no pixels ({size[0]}x{size[1]})", True
    # 32-bit integer or float samples (e.g. scientific TIFFs) decode here but not always in the reader the run uses
    # (OpenCV): ask that reader, so that a file that passes the check also loads in the run
    if mode in ("I", "F") and cv2.imread(str(path), READ_FLAGS) is None:
        return None, f"{'32-bit float' if mode == 'F' else '32-bit integer'} samples: not readable as an RGB image", True
    return size, None, True


@dataclass
class ImageCheck:
    """What the check of one folder (or list of files) found.

    Attributes:
        root: the folder the user named.
        files: the readable images (sorted), the ones to use.
        skipped: ``(name relative to root, reason)`` of every unreadable file.
        ignored: files without an image suffix, left alone.
    """

    root: Path
    files: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    ignored: int = 0

    def summary(self) -> dict:
        """For the run's output (``predictions.json``'s ``info``, ``pretrain_metrics.json``)."""
        return {"root": str(self.root), "images": len(self.files), "skipped": len(self.skipped),
                "skipped_files": [{"file": name, "reason": reason} for name, reason in self.skipped],
                "ignored_non_image_files": self.ignored}

    def format(self, max_lines: int | None = None) -> str:
        lines = [f"file {name!r}: {reason}" for name, reason in self.skipped]
        if max_lines is not None and len(lines) > max_lines:
            lines = lines[:max_lines] + [f"... and {len(lines) - max_lines} more"]
        return "\n".join(lines)


# ---- listing ---------------------------------------------------------------------------------------------------

def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def _list_folder(root: Path) -> tuple[list[Path], list[tuple[str, str]], int]:
    """``(image files, refused (name, reason), number of other files)`` under ``root`` (resolved), recursively.

    Symbolic links to files are used when they resolve inside ``root`` and refused (never opened) otherwise;
    symbolic links to folders are not followed."""
    images, refused, ignored = [], [], 0
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as e:
            refused.append((os.path.relpath(folder, root), f"folder cannot be listed ({e.strerror or e})"))
            continue
        for entry in entries:
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                stack.append(path)
                continue
            if entry.is_symlink() and entry.is_dir():
                log.info("not following the symbolic link to a folder %r", os.path.relpath(path, root))
                continue
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                ignored += 1
                continue
            name = path.relative_to(root).as_posix()
            if entry.is_symlink() and not _inside(path.resolve(), root):
                refused.append((name, f"is a symbolic link to a file outside {root}; not opened"))
            elif not entry.is_file():
                refused.append((name, "is not a regular file (or is a broken link)"))
            else:
                images.append(path)
    return sorted(images), refused, ignored


# ---- the per-folder cache --------------------------------------------------------------------------------------

def _cache_path(root: Path) -> Path | None:
    base = os.environ.get("DETKIT_CACHE_DIR")
    if base is not None and base.strip().lower() in ("", "0", "off", "none"):
        return None  # caching disabled
    if not base:
        base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "detkit")
    key = hashlib.sha256(str(root).encode("utf-8", "surrogateescape")).hexdigest()[:24]
    return Path(base) / "image_check" / f"{key}.json"


def _cache_version() -> str:
    """The check's version and the decoders' (a newer Pillow or OpenCV may read what an older one refused)."""
    import PIL

    return f"{CHECK_VERSION}/Pillow {PIL.__version__}/OpenCV {cv2.__version__}"


def _load_cache(path: Path | None, root: Path) -> dict:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _cache_version() or data.get("root") != str(root) \
            or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]


def _save_cache(path: Path | None, root: Path, entries: dict) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": _cache_version(), "root": str(root), "files": entries}),
                       encoding="utf-8")
        os.replace(tmp, path)  # atomic: concurrent runs (DDP ranks) never read half a file
    except OSError as e:  # a read-only home must not stop a run: the check is only slower next time
        log.debug("image check cache not written (%s)", e)


def _stamp(path: Path) -> list[int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    # size, modification and status-change times, inode: a file replaced with the same size and mtime (cp -p,
    # rsync -a, a re-extracted archive) still gets a new inode or ctime, so its verdict is not reused
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _check(root: Path, candidates: list[tuple[str, Path]], workers: int,
           whole_folder: bool = False) -> list[tuple[str, Path, str | None]]:
    """Decode every candidate ``(name, path)`` (or reuse the cached verdict of an unchanged file), in parallel;
    return ``(name, path, reason or None)`` in the candidates' order. ``whole_folder``: the candidates are every
    image file under ``root``, so cached entries of other names (deleted files) are dropped."""
    cache_file = _cache_path(root)
    cache = _load_cache(cache_file, root)
    stamps = [_stamp(path) for _, path in candidates]
    todo = []
    for i, ((name, path), stamp) in enumerate(zip(candidates, stamps)):
        hit = cache.get(name)
        if stamp is not None and isinstance(hit, list) and len(hit) == len(stamp) + 1 and hit[:-1] == stamp \
                and isinstance(hit[-1], (str, type(None))):
            continue
        todo.append(i)

    def verdict(i: int) -> tuple[str | None, bool]:
        name, path = candidates[i]
        if stamps[i] is None:
            return "file not found", False
        if not path.is_file():  # a folder or a FIFO named like an image: never opened (a FIFO would block)
            return "not a regular file", True
        _, reason, cacheable = _probe(path)
        return reason, cacheable

    fresh, keep = {}, {}
    if todo:
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo)))) as pool:
            results = dict(zip(todo, pool.map(verdict, todo)))
        fresh = {i: reason for i, (reason, _) in results.items()}
        keep = {i for i, (_, cacheable) in results.items() if cacheable}
        for i, reason in fresh.items():
            if stamps[i] is not None and i in keep:
                cache[candidates[i][0]] = [*stamps[i], reason]
            else:
                cache.pop(candidates[i][0], None)
    stale = set(cache) - {name for name, _ in candidates} if whole_folder else set()
    for name in stale:
        del cache[name]
    if fresh or stale:
        _save_cache(cache_file, root, cache)
    return [(name, path, fresh[i] if i in fresh else cache[name][-1]) for i, (name, path) in enumerate(candidates)]


# ---- the checks ------------------------------------------------------------------------------------------------

def _finish(check: ImageCheck, candidates: int, skip_invalid: bool, what: str) -> ImageCheck:
    if candidates and not check.files:
        first = check.skipped[0]
        raise ImageFolderError(f"{what} {check.root}: none of the {candidates} image files can be read "
                               f"(e.g. {first[0]!r}: {first[1]})".replace("\n", " "))
    if check.skipped and not skip_invalid:
        raise ImageFolderError(f"{what} {check.root}: {len(check.skipped)} of {candidates} image files cannot be "
                               f"read (skip_invalid=true skips them):\n{check.format()}")
    if check.skipped:
        log.warning("%s %s: skipped %d unreadable image file(s) of %d (listed in the run's output):\n%s", what,
                    check.root, len(check.skipped), candidates, check.format(max_lines=MAX_LOGGED))
    return check


def check_image_folder(root: str | Path, skip_invalid: bool = True, workers: int = CHECK_WORKERS,
                       what: str = "image folder") -> ImageCheck:
    """List and check every image under ``root`` (see the module docstring).

    Args:
        root: the folder.
        skip_invalid: skip unreadable files (listed once in the log, and in :meth:`ImageCheck.summary`); if
            False they are refused with :class:`ImageFolderError` listing them.
        workers: decoding threads.
        what: how messages name the folder (``"unlabeled images"``, ``"predict input"``).

    Raises:
        FileNotFoundError: ``root`` is not a folder, or holds no image files (one line naming it).
        ImageFolderError: nothing decodes (one line naming the folder), or unreadable files with
            ``skip_invalid=False``.
    """
    given = Path(root)
    if not given.is_dir():
        raise FileNotFoundError(f"{what} {given} does not exist or is not a folder")
    real = given.resolve()
    files, refused, ignored = _list_folder(real)
    if not files and not refused:
        raise FileNotFoundError(f"{what} {given}: no images ({', '.join(IMAGE_SUFFIXES)}) found in it")
    checked = _check(real, [(f.relative_to(real).as_posix(), f) for f in files], workers, whole_folder=True)
    check = ImageCheck(given, [given / name for name, _, reason in checked if reason is None],
                       sorted([*refused, *((name, r) for name, _, r in checked if r is not None)]), ignored)
    return _finish(check, len(files) + len(refused), skip_invalid, what)


def check_image_files(root: str | Path, names: Sequence[object], skip_invalid: bool = True,
                      workers: int = CHECK_WORKERS, what: str = "images") -> ImageCheck:
    """Check the images ``names`` (relative to ``root``, e.g. a COCO json's ``file_name`` values) like
    :func:`check_image_folder`; a name that is not a relative path inside ``root`` is refused unopened
    (:func:`detkit.data.validate.resolve_image_path`). The result keeps the names' order."""
    given = Path(root)
    real = given.resolve()
    candidates, refused = [], []
    for name in names:
        path, reason = resolve_image_path(real, name)
        if path is None:
            refused.append((str(name), reason))
        else:
            candidates.append((str(name), path))
    if not candidates and not refused:
        raise FileNotFoundError(f"{what} {given}: no images listed")
    checked = _check(real, candidates, workers)
    check = ImageCheck(given, [path for _, path, reason in checked if reason is None],
                       [*refused, *((name, r) for name, _, r in checked if r is not None)])
    return _finish(check, len(candidates) + len(refused), skip_invalid, what)


# ---- during a run ----------------------------------------------------------------------------------------------

#: Files found unreadable during the run, in this process (each loader worker has its own): warned about once.
_UNREADABLE: dict[str, str] = {}


def read_rgb_or_substitute(files: Sequence[Path], index: int) -> tuple[int, np.ndarray]:
    """``(j, read_rgb(files[j]))`` for ``j = index`` or, if that file became unreadable since it was checked
    (deleted, replaced), the next readable one (``index + 1, index + 2, ...`` wrapping around).

    Why substitute rather than drop: a training batch has a fixed size (and a fixed-shape SimCLR similarity
    matrix), a dataset item cannot vanish without a custom collate in every loader, and a ``None`` that a collate
    filters out would make that one batch smaller. Standing in another image for one item of one epoch changes
    training by a negligible amount; the choice depends only on the index, so runs stay reproducible. Each
    unreadable file is warned about once per process and then skipped without retrying.

    Raises:
        ImageFolderError: no file can be read any more.
    """
    n = len(files)
    if not -n <= index < n:
        raise IndexError(f"index {index} out of range for {n} images")  # ends iteration over a dataset
    for step in range(n):
        j = (index + step) % n
        key = str(files[j])
        if key in _UNREADABLE:
            continue
        try:
            return j, read_rgb(files[j])
        except OSError:
            _UNREADABLE[key] = reason = "deleted" if not os.path.exists(key) else "no longer decodes"
            log.warning("image file %r became unreadable during the run (%s); it is skipped, another image stands "
                        "in for it", key, reason)
    raise ImageFolderError(f"none of the {n} images can be read any more (the first: {str(files[0])!r})")
