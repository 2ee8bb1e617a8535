"""Pictures of where a CF-ViT looks: re-split patches, early exits, coarse confidences.

Everything the pictures show comes from :meth:`models.CFVisionTransformer.forward_details`;
nothing here re-implements the patch selection or the exit rule. Images are listed and read by
``datasets.folder`` (:func:`~datasets.folder.list_images`, :class:`~datasets.folder.ImageList`). This
module only

- maps folders and class indices to names (:func:`read_class_index`, :func:`resolve_classes`);
- gathers the per-image decisions of a model over a loader (:func:`collect_details`);
- fades the coarse patches the fine stage keeps coarse and lists the fine patches of the
  re-split ones (:func:`fade_unselected`, pure tensor functions);
- draws grids and a histogram with matplotlib's object API at exact pixel sizes
  (:func:`draw_grid`, :func:`grid_png_size`, :func:`draw_confidence_histogram`);
- writes every file atomically (``utils.common.atomic.atomic_file``).
"""
from __future__ import annotations

import io
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets.folder import unpack_batch
from datasets.safe_read import UnsafeFileError, read_capped, read_structured
from models.token_ops import FINE_SCALE, fine_children

from utils.common import atomic
from utils.common.errors import BadInputError
from utils.common.logs import shown_name
from utils.common.signals import check_stop, stop_at_steps

__all__ = [
    'FADE', 'FADE_COLOR', 'ClassIndex',
    'read_class_index', 'resolve_classes', 'short_name', 'Details', 'collect_details', 'unnormalize',
    'selected_pixel_mask', 'fine_patch_boxes', 'fade_unselected', 'GridItem', 'GridLayout',
    'grid_png_size', 'draw_grid', 'draw_confidence_histogram', 'save_figure',
]

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
Box = Tuple[int, int, int, int]  # (x0, y0, width, height) in pixels, x to the right, y down

#: Weight of the fade colour in a coarse patch the fine stage keeps coarse; the released
#: visualization drew ``0.3 * pixel + 0.7 * white``.
FADE = 0.7
#: Colour (in [0, 1], the same for every channel) toward which kept-coarse patches fade: white.
FADE_COLOR = 1.0
#: Outline colour of the re-split fine patches.
OUTLINE_COLOR = '#e4002b'
#: Longest class name shown in a title; longer ones are cut with an ellipsis.
MAX_NAME_CHARS = 22
_WNID = re.compile(r'^n\d{8}$')


# ----------------------------------------------------------------------------------- class names
@dataclass
class ClassIndex:
    """A class-index file: names of model classes and, when it names folders, their class index.

    Attributes:
        names: model class index -> name.
        folder_index: class folder name (e.g. a WordNet ID) -> model class index.
    """
    names: Dict[int, str] = field(default_factory=dict)
    folder_index: Dict[str, int] = field(default_factory=dict)


def _as_int(text: str) -> Optional[int]:
    try:
        return int(text.strip())
    except ValueError:
        return None


def _choose_column(columns: List[List[int]], num_classes: int, path: Path) -> List[int]:
    """Of several index columns, the one in the model's label space (see :func:`read_class_index`)."""
    rows = len(columns[0])
    if num_classes == rows:
        for col in columns:
            if sorted(col) == list(range(rows)):
                return col
    fitting = [col for col in columns if max(col) < num_classes and len(set(col)) == rows]
    if not fitting:
        raise BadInputError(f'no index column of {path} fits a model with {num_classes} classes')
    return fitting[-1]


def read_class_index(path: PathLike, num_classes: int) -> ClassIndex:
    """Read a class-index file.

    Accepted formats:

    - Text, one class a line, ``#`` lines and blank lines skipped:
      - tab-separated fields: integer fields are index columns, the first other field is the
        class folder, the last other field the name. Example: imagenette's ``classes.txt``
        (``wnid<TAB>index_in_this_dataset<TAB>imagenet1k_index<TAB>name``). Without an integer
        field the line number is the index.
      - ``n01440764 tench, Tinca tinca`` (ImageNet's ``LOC_synset_mapping.txt``): folder, name.
      - otherwise the whole line is the name of class ``line number``.
    - JSON: a list of names; ``{"0": "tench"}``; ``{"0": ["n01440764", "tench"]}`` (Keras'
      ``imagenet_class_index.json``); or ``{"n01440764": 0}`` / ``{"n01440764": [0, "tench"]}``.

    With several index columns, the one that numbers the rows ``0..n-1`` is used when the model
    has as many classes as the file has rows; otherwise the last column that fits the model's
    class count (for imagenette's file and a 1000-class model: the ImageNet-1k index).

    Raises:
        BadInputError: unreadable file, unknown layout, or indices outside ``[0, num_classes)``.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():  # a pipe or device is refused below
        raise BadInputError(f'--class-index-file {path} does not exist')
    out = ClassIndex()
    try:  # a regular file of bounded size (and nesting): a pipe or /dev/zero is refused, never read
        if path.suffix.lower() == '.json':
            data = read_structured(path, what='--class-index-file')
        else:
            text = read_capped(path, 16 << 20, '--class-index-file').decode('utf-8')
    except (OSError, UnicodeDecodeError, UnsafeFileError) as e:
        raise BadInputError(str(e) if isinstance(e, UnsafeFileError) else f'cannot read --class-index-file {path}: '
                            f'{e}') from None
    if path.suffix.lower() == '.json':
        _read_json_index(data, out, path)
    else:
        _read_text_index(text, out, num_classes, path)
    bad = sorted(i for i in set(out.names) | set(out.folder_index.values()) if not 0 <= i < num_classes)
    if bad:
        raise BadInputError(f'--class-index-file {path} has class indices outside [0, {num_classes}) of the '
                         f'model: {bad[:5]}')
    if not out.names and not out.folder_index:
        raise BadInputError(f'--class-index-file {path} lists no classes')
    return out


def _read_json_index(data: Any, out: ClassIndex, path: Path) -> None:
    if isinstance(data, list) and all(isinstance(v, str) for v in data):
        out.names.update(enumerate(data))
        return
    if not isinstance(data, dict):
        raise BadInputError(f'--class-index-file {path}: expected a JSON list of names or an object')
    for key, value in data.items():
        index = _as_int(str(key))
        if index is not None:  # index -> name, or index -> [folder, name]
            if isinstance(value, str):
                out.names[index] = value
            elif isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
                out.folder_index[value[0]] = index
                out.names[index] = value[1]
            else:
                raise BadInputError(f'--class-index-file {path}: cannot read entry {key!r}')
        else:  # folder -> index, or folder -> [index, name]
            if isinstance(value, int):
                out.folder_index[key] = value
            elif isinstance(value, list) and len(value) == 2 and isinstance(value[0], int):
                out.folder_index[key] = value[0]
                out.names[value[0]] = str(value[1])
            else:
                raise BadInputError(f'--class-index-file {path}: cannot read entry {key!r}')


def _read_text_index(text: str, out: ClassIndex, num_classes: int, path: Path) -> None:
    lines = [ln.rstrip('\r\n') for ln in text.splitlines()]
    lines = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith('#')]
    if any('\t' in ln for ln in lines):
        rows = [[f.strip() for f in ln.split('\t')] for ln in lines]
        ints = [[_as_int(f) for f in r] for r in rows]
        positions = [j for j in range(min(len(r) for r in rows)) if all(i[j] is not None for i in ints)]
        if positions:
            index = _choose_column([[i[j] for i in ints] for j in positions], num_classes, path)
        else:
            index = list(range(len(rows)))
        for r, idx in zip(rows, index):
            words = [f for j, f in enumerate(r) if j not in positions and f]
            if not words:
                raise BadInputError(f'--class-index-file {path}: a line has no class name: {r}')
            out.names[idx] = words[-1]
            if len(words) > 1 or positions:
                out.folder_index[words[0]] = idx
        return
    for i, ln in enumerate(lines):
        first, _, rest = ln.strip().partition(' ')
        if _WNID.match(first) and rest.strip():
            out.folder_index[first] = i
            out.names[i] = rest.strip()
        else:
            out.names[i] = ln.strip()


def _imagenet_names() -> Dict[str, str]:
    """WordNet ID -> short ImageNet-1k name, from timm's bundled class info (no network)."""
    try:
        from timm.data import ImageNetInfo
        info = ImageNetInfo()
        return {info.index_to_label_name(i): info.index_to_description(i) for i in range(info.num_classes())}
    except Exception as e:  # names are a nicety; never fail a run for them
        log.debug('no ImageNet class names from timm: %s', e)
        return {}


def short_name(name: str, limit: int = MAX_NAME_CHARS) -> str:
    """The first comma-separated part of a class description, cut to ``limit`` characters."""
    name = name.split(',')[0].strip()
    return name if len(name) <= limit else name[:limit - 1] + '\u2026'


def resolve_classes(
        num_classes: int,
        folders: Optional[Sequence[str]] = None,
        class_index: Optional[ClassIndex] = None,
) -> Tuple[List[str], Optional[Dict[str, int]]]:
    """Names of the model's classes and the model class index of each dataset folder.

    Args:
        num_classes: classes of the model's head.
        folders: class folder names of an ImageFolder (None for one's own images).
        class_index: a parsed class-index file, if any.

    Returns:
        ``(names, folder_to_target)``: ``num_classes`` display names (``#i`` where unknown), and
        the folder -> target map (None without folders). The class-index file maps folders when
        it names them all; otherwise the folders' ImageFolder order is the label space, which
        needs as many folders as the model has classes; otherwise, for a 1000-class model and
        folders named by ImageNet WordNet IDs, their ImageNet-1k index (from timm's class info).

    Raises:
        BadInputError: folders that cannot be mapped to the model's classes.
    """
    names = [f'#{i}' for i in range(num_classes)]
    imagenet: Dict[str, str] = {}
    if num_classes == 1000 or (folders is not None and any(_WNID.match(f) for f in folders)):
        imagenet = _imagenet_names()
    if num_classes == 1000 and len(imagenet) == 1000:  # timm's order is ImageNet-1k's (sorted WNIDs)
        names = list(imagenet.values())
    folder_to_target: Optional[Dict[str, int]] = None
    if folders is not None:
        if class_index is not None and class_index.folder_index and all(
                f in class_index.folder_index for f in folders):
            folder_to_target = {f: class_index.folder_index[f] for f in folders}
        elif len(folders) == num_classes:
            folder_to_target = {f: i for i, f in enumerate(folders)}
        elif num_classes == 1000 and len(imagenet) == 1000 and all(f in imagenet for f in folders):
            wnids = list(imagenet)  # an ImageNet subset (e.g. imagenette) under a 1000-class head
            folder_to_target = {f: wnids.index(f) for f in folders}
        else:
            hint = ('' if class_index is None else
                    ' (the class-index file does not name every folder)')
            raise BadInputError(
                f'the dataset has {len(folders)} class folders but the model has {num_classes} classes, '
                f'and no class-index file maps the folders to the model\'s classes{hint}')
        for f, i in folder_to_target.items():
            names[i] = imagenet.get(f, f)
    if class_index is not None:
        for i, n in class_index.names.items():
            names[i] = n
    return [short_name(n) for n in names], folder_to_target


# ------------------------------------------------------------------------------------- inference
@dataclass
class Details:
    """Per-image decisions of one pass of ``forward_details`` over a dataset.

    Attributes:
        indices: (N,) dataset index of each decoded image.
        targets: (N,) ground truth (-1 where unknown).
        confidence: (N,) coarse max-softmax probability.
        coarse_pred: (N,) coarse-stage prediction.
        fine_pred: (N,) fine-stage prediction, -1 where the image exited (the fine stage did not run).
        exited: (N,) bool.
        important: (N, k) informative coarse patches (what the fine stage re-splits).
        unreadable: dataset indices of files that could not be decoded.
    """
    indices: torch.Tensor
    targets: torch.Tensor
    confidence: torch.Tensor
    coarse_pred: torch.Tensor
    fine_pred: torch.Tensor
    exited: torch.Tensor
    important: torch.Tensor
    unreadable: List[int]

    def __len__(self) -> int:
        return int(self.indices.numel())


@torch.no_grad()
@stop_at_steps()
def collect_details(model: nn.Module, loader: DataLoader, threshold: float, device: torch.device,
                    progress: bool = True) -> Details:
    """Run ``model.forward_details(images, threshold)`` over every image of ``loader``, a DataLoader of a
    dataset with ``return_index=True`` (:class:`datasets.folder.ImageList`) and
    :func:`datasets.folder.collate_skipping`; the dataset indices it never yields are the unreadable files.

    Predictions, confidences, exits and the re-split patches are exactly what the model reports;
    the coarse image is made by the model from the fine one.
    """
    model.eval()
    parts: Dict[str, List[torch.Tensor]] = {k: [] for k in (
        'indices', 'targets', 'confidence', 'coarse_pred', 'fine_pred', 'exited', 'important')}
    seen = n_exited = 0
    bar = tqdm(loader, desc='visualize', unit='batch', disable=not progress or None, dynamic_ncols=True)  # None: no bar off a terminal
    for batch in bar:
        check_stop()  # a stop signal ends the run at the next step
        images, targets, _, indices = unpack_batch(batch)
        if images is None:
            continue
        out = model.forward_details(images.to(device, non_blocking=True), threshold)
        exited = out.exited.cpu()
        fine_pred = out.fine_logits.argmax(dim=-1).cpu()
        parts['indices'].append(indices)
        parts['targets'].append(targets)
        parts['confidence'].append(out.confidence.float().cpu())
        parts['coarse_pred'].append(out.coarse_logits.argmax(dim=-1).cpu())
        parts['fine_pred'].append(torch.where(exited, torch.full_like(fine_pred, -1), fine_pred))
        parts['exited'].append(exited)
        parts['important'].append(out.important_coarse_index.cpu())
        seen, n_exited = seen + len(exited), n_exited + int(exited.sum())
        bar.set_postfix(exited=f'{n_exited}/{seen}')
    decoded = set(torch.cat(parts['indices']).tolist()) if parts['indices'] else set()
    unreadable = [i for i in range(len(loader.dataset)) if i not in decoded]  # type: ignore[arg-type]
    if not parts['indices']:
        long = torch.empty(0, dtype=torch.long)
        return Details(indices=long, targets=long, confidence=torch.empty(0), coarse_pred=long, fine_pred=long,
                       exited=torch.empty(0, dtype=torch.bool), important=torch.empty(0, 0, dtype=torch.long),
                       unreadable=unreadable)
    return Details(**{k: torch.cat(v) for k, v in parts.items()}, unreadable=unreadable)


# --------------------------------------------------------------------------------------- masking
def unnormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo the transform's normalization: (..., 3, H, W) -> pixel values clamped to [0, 1]."""
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x * std_t + mean_t).clamp(0.0, 1.0)


def _patch_size(image_size: Tuple[int, int], grid: Tuple[int, int]) -> Tuple[int, int]:
    (H, W), (h, w) = image_size, grid
    if H % (FINE_SCALE * h) or W % (FINE_SCALE * w):
        raise ValueError(f'a {H}x{W} image does not split into the fine grid of a {h}x{w} coarse grid')
    return H // h, W // w


def selected_pixel_mask(important: torch.Tensor, grid: Tuple[int, int], image_size: Tuple[int, int]) -> torch.Tensor:
    """Pixels of the coarse patches that the fine stage re-splits.

    Args:
        important: (k,) row-major indices on the coarse ``grid`` (h, w).
        grid: coarse grid.
        image_size: (H, W) of the image, a multiple of the fine grid.

    Returns:
        (H, W) bool, True inside the re-split coarse patches.
    """
    ph, pw = _patch_size(image_size, grid)
    h, w = grid
    cells = torch.zeros(h * w, dtype=torch.bool, device=important.device)
    cells[important.long()] = True
    return cells.view(h, w).repeat_interleave(ph, 0).repeat_interleave(pw, 1)


def fine_patch_boxes(important: torch.Tensor, grid: Tuple[int, int], image_size: Tuple[int, int]) -> List[Box]:
    """Pixel boxes ``(x0, y0, width, height)`` of the fine children of the re-split coarse patches.

    The children come from :func:`models.token_ops.fine_children`, the function the fine stage
    uses, so the outlines show the fine tokens the model actually sees.
    """
    ph, pw = _patch_size(image_size, grid)
    fh, fw = ph // FINE_SCALE, pw // FINE_SCALE
    fine_w = FINE_SCALE * grid[1]
    children = fine_children(important.long().view(1, -1), grid)[0].tolist()  # (4k,)
    return [((c % fine_w) * fw, (c // fine_w) * fh, fw, fh) for c in children]


def fade_unselected(
        image: torch.Tensor,
        grid: Tuple[int, int],
        important: torch.Tensor,
        fade: float = FADE,
        color: float = FADE_COLOR,
) -> Tuple[torch.Tensor, List[Box]]:
    """Fade the coarse patches the fine stage keeps coarse; list the re-split fine patches.

    Args:
        image: (3, H, W) un-normalized image in [0, 1], H and W multiples of the fine grid.
        grid: coarse grid (h, w).
        important: (k,) informative coarse indices (``CFOutput.important_coarse_index`` of the image).
        fade: weight of ``color``: a kept-coarse pixel becomes ``(1 - fade) * p + fade * color``.
        color: fade colour in [0, 1] (1 = white).

    Returns:
        ``(faded, boxes)``: the (3, H, W) image, unchanged inside the re-split patches, and the
        ``4k`` fine-patch boxes of :func:`fine_patch_boxes` to outline.
    """
    if image.dim() != 3:
        raise ValueError(f'expected one (3, H, W) image, got {tuple(image.shape)}')
    if not 0.0 <= fade <= 1.0:
        raise ValueError(f'fade must be in [0, 1], got {fade}')
    size = (image.shape[-2], image.shape[-1])
    keep = selected_pixel_mask(important, grid, size)  # (H, W)
    blended = image * (1.0 - fade) + fade * color
    return torch.where(keep, image, blended), fine_patch_boxes(important, grid, size)


# --------------------------------------------------------------------------------------- drawing
@dataclass
class GridItem:
    """One image of a grid: the un-normalized (3, H, W) input, its re-split patches and title lines.

    ``lines`` are ``(text, colour)`` pairs, drawn top to bottom above the image pair.
    """
    image: torch.Tensor
    important: torch.Tensor
    lines: List[Tuple[str, str]]


@dataclass(frozen=True)
class GridLayout:
    """Pixel geometry of a grid: each image is a pair (input | faded) under its title.

    PNG width is ``max(min_width, 2 * pad + cols * (2 * panel + inner_gap) + (cols - 1) * pair_gap)``
    (``min_width`` leaves room for the header lines) and height
    ``header + rows * (title + panel) + (rows - 1) * row_gap + pad`` (:func:`grid_png_size`).
    """
    panel: int = 224
    pairs_per_row: int = 4
    pad: int = 10
    header: int = 66
    title: int = 62
    inner_gap: int = 4
    pair_gap: int = 16
    row_gap: int = 10
    min_width: int = 640
    dpi: int = 100


def grid_png_size(n: int, layout: GridLayout = GridLayout()) -> Tuple[int, int]:
    """``(width, height)`` in pixels of the PNG that :func:`draw_grid` writes for ``n`` images."""
    if n < 1:
        raise ValueError('a grid needs at least one image')
    cols = min(layout.pairs_per_row, n)
    rows = math.ceil(n / cols)
    width = 2 * layout.pad + cols * (2 * layout.panel + layout.inner_gap) + (cols - 1) * layout.pair_gap
    width = max(width, layout.min_width)
    height = layout.header + rows * (layout.title + layout.panel) + (rows - 1) * layout.row_gap + layout.pad
    return width, height


def _to_hwc(image: torch.Tensor) -> Any:
    return image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def draw_grid(
        items: Sequence[GridItem],
        grid: Tuple[int, int],
        path: PathLike,
        header: Sequence[str],
        layout: GridLayout = GridLayout(),
        fade: float = FADE,
) -> Tuple[int, int]:
    """Draw image pairs (input | kept-coarse patches faded, re-split fine patches outlined) to a PNG.

    Args:
        items: the images, in reading order.
        grid: coarse grid (h, w) of the model.
        path: PNG to write (atomically).
        header: up to three lines written across the top (keep each under ~95 characters).
        layout: pixel geometry; the PNG has exactly :func:`grid_png_size` pixels.
        fade: see :func:`fade_unselected`.

    Returns:
        The PNG's (width, height).
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    W, H = grid_png_size(len(items), layout)
    fig = Figure(figsize=(W / layout.dpi, H / layout.dpi), dpi=layout.dpi)
    fig.patch.set_facecolor('white')
    for j, text in enumerate(list(header)[:3]):
        fig.text(layout.pad / W, 1 - (6 + 18 * j + (2 if j else 0)) / H, shown_name(text), ha='left', va='top',
                 fontsize=11 if j == 0 else 9, weight='bold' if j == 0 else 'normal')
    cols = min(layout.pairs_per_row, len(items))
    P = layout.panel
    line_px = (layout.title - 6) / 4
    for n, item in enumerate(items):
        r, c = divmod(n, cols)
        x0 = layout.pad + c * (2 * P + layout.inner_gap + layout.pair_gap)
        y0 = layout.header + r * (layout.title + P + layout.row_gap)
        for j, (text, colour) in enumerate(item.lines[:4]):
            fig.text(x0 / W, 1 - (y0 + 2 + j * line_px) / H, shown_name(text), ha='left', va='top', fontsize=8,
                     color=colour)
        faded, boxes = fade_unselected(item.image, grid, item.important, fade=fade)
        for k, picture in enumerate((item.image, faded)):
            left = x0 + k * (P + layout.inner_gap)
            ax = fig.add_axes((left / W, 1 - (y0 + layout.title + P) / H, P / W, P / H))
            ax.imshow(_to_hwc(picture), interpolation='nearest' if picture.shape[-1] == P else 'antialiased')
            ax.set_axis_off()
            if k == 1:
                for bx, by, bw, bh in boxes:  # pixel edges sit at -0.5 in imshow's coordinates
                    ax.add_patch(Rectangle((bx - 0.5, by - 0.5), bw, bh, fill=False, lw=0.6,
                                           edgecolor=OUTLINE_COLOR))
    save_figure(fig, path, layout.dpi)
    return W, H


def draw_confidence_histogram(
        confidence: torch.Tensor,
        threshold: float,
        path: PathLike,
        correct: Optional[torch.Tensor] = None,
        title: str = '',
        bins: int = 20,
        size: Tuple[int, int] = (640, 400),
        dpi: int = 100,
) -> Tuple[int, int]:
    """Histogram of coarse confidences with the early-exit threshold marked, written to a PNG.

    Args:
        confidence: (N,) coarse max-softmax probabilities.
        threshold: the exit threshold (images at or above it exit).
        path: PNG to write (atomically).
        correct: (N,) bool coarse correctness, to stack correct and wrong images (optional).
        title: figure title.
        bins: bins over [0, 1].
        size: PNG (width, height) in pixels.
        dpi: resolution.

    Returns:
        The PNG's (width, height).
    """
    from matplotlib.figure import Figure

    conf = confidence.detach().float().cpu().numpy()
    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, layout='constrained')
    ax = fig.add_subplot()
    edges = [i / bins for i in range(bins + 1)]
    if correct is not None:
        ok = correct.detach().cpu().numpy().astype(bool)
        ax.hist([conf[ok], conf[~ok]], bins=edges, stacked=True, color=['#2a9d8f', '#e76f51'],
                label=['coarse prediction right', 'coarse prediction wrong'])
    else:
        ax.hist(conf, bins=edges, color='#457b9d', label='images')
    share = float((confidence >= threshold).float().mean()) if conf.size else 0.0
    ax.axvline(threshold, color='black', linestyle='--', linewidth=1.2,
               label=f'threshold {threshold:.3g}: {100 * share:.1f}% exit at the coarse stage')
    ax.set_xlim(0, 1)
    ax.set_xlabel('coarse confidence (max softmax probability)')
    ax.set_ylabel('images')
    ax.set_title(shown_name(title), fontsize=10)
    fig.legend(fontsize=8, loc='outside lower center', ncols=2)  # below the axes: the threshold line never crosses it
    save_figure(fig, path, dpi)
    return size


# ------------------------------------------------------------------------------------------- io
def save_figure(fig: Any, path: PathLike, dpi: int) -> None:
    """Save a matplotlib figure as PNG atomically, at its own size (no tight bounding box)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=dpi, facecolor='white')
    with atomic.atomic_file(path) as f:
        f.write(buffer.getvalue())
