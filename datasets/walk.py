"""Where image files enter the scripts: a safe folder walk and a decoder for every PIL mode.

- :func:`walk_files` lists the files under a folder, following symbolic links to folders but
  entering each folder at most once (by device and inode), so a link loop
  (``ln -s . val/cls/again``) neither repeats images nor hangs; folders on kernel file systems
  (``/proc``, ``/sys``) and links to a folder that contains the walk's root (``ln -s / cls/up``) are
  not entered. Anything that is not a regular
  file (a named pipe, a socket, a device, a dangling link) is skipped with a warning and counted.
- :func:`decode_image` opens a file without blocking (a FIFO that slipped in is refused, not
  waited on), refuses headers that declare more than :data:`MAX_PIXELS` pixels or an aspect
  ratio beyond :data:`MAX_ASPECT_RATIO` before decoding (a tiny file can declare a huge image, and
  resizing a 1 x 2,000,000 image to a 256 px short side needs gigabytes), and converts every PIL
  mode to 8-bit RGB: 16-bit and 32-bit integer images are scaled (not clipped), float images
  taken as [0, 1] or [0, 255], palette and alpha images converted through RGBA. Any exception
  PIL raises becomes :class:`UnreadableImageError`.
"""
from __future__ import annotations

import io
import logging
import os
import stat
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Sequence, Set, Tuple

import numpy as np
from PIL import Image

from .safe_read import UnsafeFileError, link_above_root, open_regular, special_filesystem

__all__ = ['MAX_PIXELS', 'MAX_ASPECT_RATIO', 'UnreadableImageError', 'WalkResult', 'walk_files', 'image_files',
           'class_folder_samples', 'decode_image']

_logger = logging.getLogger(__name__)

#: Largest image decoded (PIL's own decompression-bomb warning limit, about 89 megapixels).
MAX_PIXELS = 89_478_485
#: Longest side / shortest side beyond which an image is refused (the eval resize would explode).
MAX_ASPECT_RATIO = 100


class UnreadableImageError(OSError):
    """A file that cannot be decoded as an image (the message says why)."""


@dataclass
class WalkResult:
    """Regular files found (sorted, as ``os.path.join`` paths) and what was skipped."""
    files: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)  # not regular files: FIFOs, sockets, devices, dangling links
    repeated_dirs: List[str] = field(default_factory=list)  # folders reached a second time (link loops)
    refused_dirs: List[str] = field(default_factory=list)  # special file systems, links to above the root


def walk_files(root: str, accept: Callable[[str], bool] = lambda name: True, warn: bool = True,
               _seen: Optional[Set[Tuple[int, int]]] = None, within: Sequence[str] = ()) -> WalkResult:
    """Every regular file under ``root`` whose name ``accept`` takes, each folder entered once.

    Args:
        root: the folder.
        accept: filter on file names (e.g. image extensions); rejected names are not stat'ed.
        warn: log one warning per skipped entry and per repeated folder.
        within: folders (real paths) that are listed anyway: a link to a folder inside one of them
            is an alias (``ln -s .. cls/up``) and is not followed, so no image is listed under a
            class folder it does not belong to. ``root`` itself is always one.
    """
    out = WalkResult()
    seen: Set[Tuple[int, int]] = set() if _seen is None else _seen
    listed = [os.path.realpath(p) for p in (os.fspath(root), *within)]
    stack = [os.fspath(root)]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            out.repeated_dirs.append(folder)
            continue
        if special_filesystem(st):  # /proc, /sys...: /proc/<pid>/root alone leads to the whole file system
            out.refused_dirs.append(folder)
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            _logger.warning('cannot list %s (%s): skipped', folder, e.strerror or e)
            continue
        subdirs = []
        for entry in entries:
            path = os.path.join(folder, entry.name)
            try:
                is_dir = entry.is_dir()  # follows links
            except OSError:
                is_dir = False
            if is_dir:
                if entry.is_symlink() and _inside(os.path.realpath(path), listed):
                    out.repeated_dirs.append(path)  # an alias of a folder listed anyway
                elif entry.is_symlink() and link_above_root(path, listed):
                    out.refused_dirs.append(path)  # leads above the root: the tree would contain itself
                else:
                    subdirs.append(path)
                continue
            if not accept(entry.name):
                continue
            try:
                regular = stat.S_ISREG(os.stat(path).st_mode)
            except OSError:  # a dangling link
                regular = False
            (out.files if regular else out.skipped).append(path)
        stack.extend(reversed(subdirs))  # depth first, in name order
    out.files.sort()
    if warn:
        for path in out.skipped:
            _logger.warning('%s is not a regular file (a pipe, socket, device or dangling link): skipped', path)
        for path in out.repeated_dirs:
            _logger.warning('%s leads to a folder already listed (a link loop?): not listed again', path)
        for path in out.refused_dirs:
            _logger.warning('%s is on a kernel file system (/proc, /sys, ...) or links to a folder above the data: '
                            'not listed', path)
    return out


def _inside(path: str, folders: Sequence[str]) -> bool:
    return any(path == f or path.startswith(f.rstrip(os.sep) + os.sep) for f in folders)


def _read_regular(path: str) -> bytes:
    """The bytes of ``path``, refusing anything but a regular file without blocking on it."""
    try:
        fd = open_regular(path, what='image')
    except UnsafeFileError:
        raise UnreadableImageError(f'{path} is not a regular file') from None
    with os.fdopen(fd, 'rb') as f:
        return f.read()


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB of any PIL mode; high bit depths are scaled to 0..255, not clipped."""
    mode = img.mode
    if mode in ('RGB',):
        return img
    if mode.startswith('I;16') or mode in ('I', 'F'):
        a = np.asarray(img, dtype=np.float64)
        if mode.startswith('I;16'):
            a = a / 257.0
        elif mode == 'I':  # 32-bit integers: 16-bit files (PNG, TIFF) hold 0..65535; 8-bit data stays
            a = a / 257.0 if a.max(initial=0) > 255 else a
        else:  # float images: [0, 1] data (the usual) or already [0, 255]
            a = a * 255.0 if a.max(initial=0) <= 1.0 else a
        a = np.clip(np.rint(np.nan_to_num(a)), 0, 255).astype(np.uint8)
        return Image.fromarray(a, 'L').convert('RGB')
    if mode in ('P', 'PA', 'LA', 'La', 'RGBa') or 'A' in mode or 'transparency' in img.info:
        img = img.convert('RGBA')
    return img.convert('RGB')


def decode_image(path: str, max_pixels: int = MAX_PIXELS, max_aspect_ratio: float = MAX_ASPECT_RATIO) -> Image.Image:
    """Decode ``path`` to an 8-bit RGB image.

    Raises:
        UnreadableImageError: not a regular file, a header beyond the pixel or aspect-ratio limits,
            or anything PIL raises while reading it (corrupt, truncated, crafted files).
    """
    try:
        data = _read_regular(path)
    except UnreadableImageError:
        raise
    except OSError as e:
        raise UnreadableImageError(f'cannot read {path}: {e.strerror or e}') from e
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # EXIF, palette-transparency and bomb warnings of Pillow
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                if w < 1 or h < 1:
                    raise UnreadableImageError(f'{path} declares an empty image ({w}x{h})')
                if w * h > max_pixels:
                    raise UnreadableImageError(f'{path} declares {w}x{h} pixels, more than the limit of {max_pixels}')
                if max(w, h) > max_aspect_ratio * min(w, h):
                    raise UnreadableImageError(f'{path} declares {w}x{h} pixels, an aspect ratio beyond '
                                               f'{max_aspect_ratio}:1')
                img.load()
                return _to_rgb(img)
    except UnreadableImageError:
        raise
    except Exception as e:  # PIL raises many types (OSError, ValueError, SyntaxError, TypeError, MemoryError)
        raise UnreadableImageError(f'{path}: {type(e).__name__}: {e}') from e


def image_files(root: str, extensions: Iterable[str], warn: bool = True,
                _seen: Optional[Set[Tuple[int, int]]] = None, within: Sequence[str] = ()) -> WalkResult:
    """:func:`walk_files` keeping file names that end in one of ``extensions`` (case-insensitive)."""
    ext = tuple(e.lower() for e in extensions)
    return walk_files(root, lambda name: name.lower().endswith(ext), warn=warn, _seen=_seen, within=within)


def class_folder_samples(root: str, classes: Sequence[str],
                         extensions: Iterable[str]) -> Tuple[List[Tuple[str, str]], int]:
    """``([(path, class folder name), ...], skipped)`` of an ImageFolder's class folders, in class
    order then path order; every folder is entered once over the whole tree, and a link into the
    tree itself (into the root or a class folder) is not followed, so an image is only ever listed
    under its own class folder. ``skipped`` counts entries that are not
    regular files (each is logged)."""
    seen: Set[Tuple[int, int]] = set()
    samples: List[Tuple[str, str]] = []
    skipped = 0
    listed = [root, *(os.path.join(root, name) for name in classes)]  # links into these are aliases
    for name in classes:
        found = image_files(os.path.join(root, name), extensions, _seen=seen, within=listed)
        samples.extend((path, name) for path in found.files)
        skipped += len(found.skipped)
    if skipped:
        _logger.warning('%d entries of %s that are not regular files were skipped', skipped, root)
    return samples, skipped
