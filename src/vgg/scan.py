"""Finding the images in a class-per-folder dataset (the train/validation split of them is ``splits.py``).

Files are recognised by their first bytes, not their names: a PNG saved as ``.jpg`` is used, a text file named
``.jpg`` is a bad file with a reason, and ``notes.txt`` is ignored. Hidden files and folders and OS clutter
(``.DS_Store``, ``__MACOSX``, ``Thumbs.db``) are never looked at. Big folders are indexed once and cached: the
cache is keyed by the modification times of every folder, which change whenever a file is added, removed or
renamed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import stat
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from .errors import UsageError
from .files import atomic_write

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
IGNORED_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini", "$RECYCLE.BIN", "System Volume Information"}
# Folders with fewer files than this are indexed every time: reading 16 bytes of a few thousand files is faster
# than proving a cache is still valid, and a cache would only go stale under the user's feet.
CACHE_MIN_FILES = 2000
INDEX_VERSION = 1
# Image files bigger than this are refused before they are read (a photo is a few MB; a 89 Mpx TIFF is ~270 MB).
MAX_FILE_BYTES = 256 * 1024**2


def sniff(head: bytes) -> str | None:
    """The image format named by a file's first bytes, or ``None`` when they are not an image's."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[:2] == b"BM" and len(head) >= 14:
        return "bmp"
    if len(head) >= 3 and head[0:1] == b"P" and head[1:2] in b"123456" and head[2:3] in b" \t\r\n":
        return "pnm"
    return None


_SPECIAL_FILES = {
    stat.S_IFIFO: "a named pipe",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a folder",
}


def _open_fd(path: str | Path) -> tuple[int, int]:
    """A file descriptor open for reading on a regular file, and its size; see ``open_regular``."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"not a regular file ({_SPECIAL_FILES.get(stat.S_IFMT(info.st_mode), 'special file')})")
    except BaseException:
        os.close(fd)
        raise
    return fd, info.st_size


def open_regular(path: str | Path) -> tuple[io.BufferedReader, int]:
    """Open a regular file for reading, with its size; anything else is refused without blocking.

    A named pipe in a data folder would block a plain ``open`` forever (until something writes to it), and a
    device would be read without end; ``O_NONBLOCK`` makes the open return at once, and ``fstat`` on the open file
    (not the name, which could change in between) says what it is.

    Raises:
        OSError: the file cannot be opened (``FileNotFoundError`` when it does not exist).
        ValueError: it is not a regular file; the message is the reason.
    """
    fd, size = _open_fd(path)
    return os.fdopen(fd, "rb"), size


def read_regular(path: str | Path) -> bytes:
    """The content of a regular file of at most ``MAX_FILE_BYTES``.

    Plain ``os.read`` calls of the size ``fstat`` gives (a buffered ``read(MAX_FILE_BYTES)`` would allocate the whole
    limit for every small file, which doubled the cost of reading a 28 px PNG).

    Raises:
        OSError, ValueError: as ``open_regular``; ValueError also for a file over ``MAX_FILE_BYTES``.
    """
    fd, size = _open_fd(path)
    try:
        if size > MAX_FILE_BYTES:
            raise ValueError(_too_large(size))
        parts, total = [], 0
        while chunk := os.read(fd, min(max(size - total, 0) + 1, MAX_FILE_BYTES + 1 - total)):
            parts.append(chunk)
            total += len(chunk)
            if total > MAX_FILE_BYTES:  # it grew after it was opened
                raise ValueError(_too_large(total))
    finally:
        os.close(fd)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _too_large(size: int) -> str:
    return f"file too large ({size:,} bytes or more, limit {MAX_FILE_BYTES:,} bytes)"


def classify(path: str | Path) -> tuple[str, str]:
    """``("image", format)``, ``("bad", reason)`` for a file named as an image that is not one, or ``("other", "")``.

    Something that is not a regular file (a named pipe, a device) is never read: it is bad when it is named as an
    image and other otherwise. An image over ``MAX_FILE_BYTES`` is bad.
    """
    try:
        handle, size = open_regular(path)
        with handle:
            head = handle.read(16)
    except ValueError as error:
        return ("bad", str(error)) if Path(path).suffix.lower() in IMAGE_EXTENSIONS else ("other", "")
    except OSError as error:
        return "bad", f"unreadable ({error.strerror or error})"
    kind = sniff(head)
    if size > MAX_FILE_BYTES and (kind is not None or Path(path).suffix.lower() in IMAGE_EXTENSIONS):
        return "bad", _too_large(size)
    if kind is not None:
        return "image", kind
    if Path(path).suffix.lower() not in IMAGE_EXTENSIONS:
        return "other", ""
    if not head:
        return "bad", "empty file (0 bytes)"
    text = all(32 <= b < 127 or b in (9, 10, 13) for b in head)
    return "bad", "not an image (its content is text)" if text else "not an image (unknown content)"


def visible(name: str) -> bool:
    return not name.startswith(".") and name not in IGNORED_NAMES


def walk(folder: Path) -> Iterator[tuple[str, list[str]]]:
    """Visible folders under ``folder`` (sorted, the folder itself first) with their visible files."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if visible(d))
        yield dirpath, sorted(f for f in filenames if visible(f))


def image_files(folder: str | Path, bad: bool = False) -> Iterator[Path]:
    """Every image under ``folder``, nested folders included, recognised by content.

    ``bad``: also the files named as images that are not usable ones (``classify``), so that they can be reported.
    """
    wanted = ("image", "bad") if bad else ("image",)
    for dirpath, names in walk(Path(folder)):
        for name in names:
            path = Path(dirpath) / name
            if classify(path)[0] in wanted:
                yield path


@dataclass
class Index:
    """Every visible file of a dataset folder, sorted, as ``(path relative to root, kind, detail)``."""

    root: Path
    files: list[tuple[str, str, str]]
    folders: dict[str, int] = field(default_factory=dict)


def _cache_dir() -> Path:
    return Path(os.environ.get("VGG_CACHE_DIR") or Path.home() / ".cache" / "vgg") / "index"


def _cache_file(root: Path) -> Path:
    return _cache_dir() / (hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:20] + ".json")


def _load_cached(root: Path) -> Index | None:
    """The cached index of ``root``, or ``None`` when there is none, it is stale, or it is not one we wrote (then the
    folder is indexed again and the cache rewritten)."""
    try:
        data = json.loads(_cache_file(root).read_text())
        if (
            not isinstance(data, dict)
            or data.get("version") != INDEX_VERSION
            or data.get("root") != str(root.resolve())
        ):
            return None
        folders, files = data["folders"], data["files"]
        if not isinstance(folders, dict) or not isinstance(files, list) or not all(map(_inside, folders)):
            return None
        for folder, mtime in folders.items():
            if type(mtime) is not int or os.stat(root / folder).st_mtime_ns != mtime:
                return None
        rows = [tuple(row) for row in files if isinstance(row, list)]
        if len(rows) != len(files) or not all(_index_row(row) for row in rows):
            return None
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None
    return Index(root, rows, folders)


def _inside(relative: object) -> bool:
    """A relative path that stays inside the indexed folder."""
    return isinstance(relative, str) and not os.path.isabs(relative) and ".." not in Path(relative).parts


def _index_row(row: tuple) -> bool:
    return (
        len(row) == 3
        and all(isinstance(part, str) for part in row)
        and row[1] in ("image", "bad", "other")
        and _inside(row[0])
        and "\0" not in row[0]
    )


def _save_cached(index: Index) -> None:
    data = {
        "version": INDEX_VERSION,
        "root": str(index.root.resolve()),
        "folders": index.folders,
        "files": index.files,
    }
    path = _cache_file(index.root)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda temp: Path(temp).write_text(json.dumps(data)))
    except OSError as error:  # a read-only home must not stop training
        log.warning("could not write the index cache %s: %s", path, error)


def index_folder(
    root: str | Path, cache: bool = True, cache_min_files: int = CACHE_MIN_FILES, progress: bool = False
) -> Index:
    """Index every visible file under ``root``, reusing the cached index while no folder has changed.

    ``progress``: a bar (files/s) while the files are classified; the total is unknown until the walk ends.
    """
    root = Path(root)
    if cache:
        cached = _load_cached(root)
        if cached is not None:
            log.info("index of %s read from cache %s", root, _cache_file(root))
            return cached
    files: list[tuple[str, str, str]] = []
    folders: dict[str, int] = {}
    with tqdm(desc=f"index {root.name or root}", unit="file", leave=False, disable=not progress) as bar:
        for dirpath, names in walk(root):
            relative = os.path.relpath(dirpath, root)
            folders[relative] = os.stat(dirpath).st_mtime_ns
            for name in names:
                kind, detail = classify(os.path.join(dirpath, name))
                files.append((os.path.normpath(os.path.join(relative, name)), kind, detail))
            bar.update(len(names))
    index = Index(root, files, folders)
    if cache and len(files) >= cache_min_files:
        _save_cached(index)
    return index


@dataclass
class Sample:
    path: Path
    label: int


@dataclass
class ImageFolder:
    """The result of scanning a class-per-folder dataset.

    Attributes:
        skipped: files named as images whose content is not a usable image, with the reason.
        ignored: other files (notes, metadata) that are not images and were left out.
    """

    root: Path
    classes: list[str]
    samples: list[Sample]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        counter = Counter(s.label for s in self.samples)
        return {name: counter.get(i, 0) for i, name in enumerate(self.classes)}


def class_folders(root: Path) -> list[str]:
    """The visible first-level folders of ``root``; errors when ``root`` is not a dataset folder."""
    if not root.is_dir():
        what = "a file" if root.exists() else "nothing"
        raise UsageError(
            f"Data folder not found: {root} is {what}. Expected a folder with one subfolder per class: "
            f"{root}/<class>/<image>."
        )
    entries = [e for e in os.scandir(root) if visible(e.name)]
    found = sorted(e.name for e in entries if e.is_dir())
    if not found:
        files = sum(1 for e in entries if e.is_file())
        raise UsageError(
            f"No class folders in {root}/: expected {root}/<class>/<image>. Found {files} files and 0 folders."
        )
    return found


def scan_folder(
    root: str | Path, classes: Sequence[str] | None = None, cache: bool = True, progress: bool = False
) -> ImageFolder:
    """Index ``root/<class>/**/<image>``.

    Args:
        root: the dataset folder.
        classes: the class names to expect (a validation folder must have the training classes); by default
            the sorted names of the visible subfolders.
        cache: reuse (and write) the cached index of a big folder.
        progress: a bar while a folder is indexed (not when the cached index is used).

    Raises:
        UsageError: the folder is missing, has fewer than two classes, or a class has no usable images.
    """
    root = Path(root)
    found = class_folders(root)
    if classes is None:
        if len(found) < 2:
            raise UsageError(
                f"Only one class in {root}/ ({found[0]!r}): expected at least 2 class folders, "
                f"e.g. {root}/cat/ and {root}/dog/."
            )
        classes = found
    else:
        classes = list(classes)
        if sorted(found) != sorted(classes):
            missing = sorted(set(classes) - set(found))
            extra = sorted(set(found) - set(classes))
            raise UsageError(
                f"Classes in {root}/ differ from the training classes: missing {missing}, unexpected {extra}."
            )
    label_of = {name: i for i, name in enumerate(classes)}
    folder = ImageFolder(root, list(classes), [])
    for relative, kind, detail in index_folder(root, cache, progress=progress).files:
        top = relative.split(os.sep, 1)[0]
        if top == relative or top not in label_of:  # files at the top level belong to no class
            continue
        if kind == "image":
            folder.samples.append(Sample(root / relative, label_of[top]))
        elif kind == "bad":
            folder.skipped.append((str(root / relative), detail))
        else:
            folder.ignored.append(str(root / relative))
    folder.samples.sort(key=lambda s: (s.label, str(s.path)))
    counts = folder.counts()
    for name in classes:
        if counts[name] == 0:
            bad = sum(1 for path, _ in folder.skipped if Path(path).is_relative_to(root / name))
            other = sum(1 for path in folder.ignored if Path(path).is_relative_to(root / name))
            raise UsageError(
                f"Class folder {root / name}/ has no images: expected jpg, png, gif, webp, bmp, tiff or ppm files. "
                f"Found {bad} bad image files and {other} other files; add images or remove the folder."
            )
    for path, reason in folder.skipped:
        log.warning("skipping %s: %s", path, reason)
    return folder
