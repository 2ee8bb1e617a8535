"""Early exit on onnxruntime: :class:`OnnxEarlyExit` runs an export folder (``utils.inference.onnx_export``).

It keeps the contract of the PyTorch model's ``forward_early_exit(x, threshold)`` and
``forward_details(x, threshold)``: the coarse graph runs on the whole batch, a row exits when its
coarse max-softmax is ``>= threshold`` (decided here, in torch, as the model decides it), and the
fine graph runs only for the rows that go on, not at all when every row exits. Inputs and outputs
are torch tensors, so the evaluation loops of ``utils.inference`` take it in place of a model.

Loading checks the folder: the manifest's format, both graph files, their SHA-256 against the
manifest (a graph of another export is refused), and the graphs' input and output shapes against
the manifest's sizes and class count. The CUDA execution provider is used when onnxruntime has it
(untested here: this project's machines have no GPU), else the CPU one.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from datasets.safe_read import UnsafeFileError, check_schema, read_structured
from models.cf_vit import CFOutput, exit_mask
from models.export import COARSE_INPUTS, COARSE_OUTPUTS, FINE_INPUTS, FINE_OUTPUTS
from models.token_ops import fine_children, rank_coarse_patches
from utils.common.atomic import sha256_file
from utils.common.errors import BadInputError
from utils.inference.onnx_export import EXPORT_FORMAT, FORMAT_VERSION, GRAPH_FILES, MANIFEST_NAME

#: What the runtime reads from a manifest, with its type (``datasets.safe_read.check_schema``).
MANIFEST_SCHEMA = {'model': str, 'img_size_list': [int], 'num_classes': int, 'coarse_stage_size': int,
                   'gflops': [float], 'data_config': dict, 'graphs': dict}

__all__ = ['ExportFolderError', 'OnnxEarlyExit', 'read_manifest', 'default_providers', 'make_session']

PathLike = Union[str, os.PathLike]


class ExportFolderError(BadInputError):
    """An export folder that cannot be run (message meant for a person)."""


def read_manifest(folder: PathLike) -> Dict[str, Any]:
    """The manifest of an export folder, checked to be one of ours in a known format version."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportFolderError(f'export folder not found: {folder}')
    path = folder / MANIFEST_NAME
    try:  # a regular file of at most 1 MiB, bounded nesting (a pipe or /dev/zero is refused, never read)
        manifest = read_structured(path, 1 << 20, 8, 'the export manifest')
    except FileNotFoundError:
        raise ExportFolderError(f'{folder} has no {MANIFEST_NAME}: it is not a folder written by export_onnx.py') from None
    except UnsafeFileError as e:
        raise ExportFolderError(str(e)) from None
    if not isinstance(manifest, dict) or manifest.get('format') != EXPORT_FORMAT:
        raise ExportFolderError(f'{path} is not a CF-ViT early-exit export manifest (format {EXPORT_FORMAT!r})')
    if manifest.get('format_version') != FORMAT_VERSION:
        raise ExportFolderError(f'{path} has format version {manifest.get("format_version")}, this code reads '
                                f'{FORMAT_VERSION}')
    missing = [k for k in ('model', 'img_size_list', 'num_classes', 'gflops', 'data_config', 'graphs')
               if k not in manifest]
    if missing:
        raise ExportFolderError(f'{path} lacks {", ".join(missing)}')
    _check_manifest_values(manifest, path)
    return manifest


def _check_manifest_values(manifest: Dict[str, Any], path: Path) -> None:
    """Types and ranges of every manifest field the runtime uses (one line naming the first bad one)."""
    try:
        check_schema(manifest, MANIFEST_SCHEMA, f'the export manifest {path}')
    except UnsafeFileError as e:
        raise ExportFolderError(str(e)) from None
    cfg = manifest['data_config']
    problems = [
        (len(manifest['img_size_list']) == 2 and all(1 <= v <= 8192 for v in manifest['img_size_list']),
         'img_size_list must be two image sides [coarse, fine]'),
        (1 <= manifest['num_classes'] <= 1_000_000, 'num_classes must be a positive class count'),
        (1 <= manifest['coarse_stage_size'] <= 1024, 'coarse_stage_size must be a positive grid side'),
        (len(manifest['gflops']) == 2 and all(v >= 0 for v in manifest['gflops']),
         'gflops must be two non-negative numbers [coarse, coarse + fine]'),
        (all(isinstance(cfg.get(k), list) and len(cfg[k]) == 3 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in cfg[k])
            for k in ('mean', 'std')), 'data_config mean and std must be three finite numbers each'),
        (all(v > 0 for v in cfg.get('std', [1]) if isinstance(v, (int, float))), 'data_config std must be positive'),
        (isinstance(manifest.get('num_informative', 1), int) and manifest.get('num_informative', 1) >= 1,
         'num_informative must be a positive integer'),
    ]
    for ok, message in problems:
        if not ok:
            raise ExportFolderError(f'the export manifest {path}: {message}')


def default_providers() -> List[str]:
    """CUDA when onnxruntime was built with it, then CPU."""
    import onnxruntime as ort
    available = ort.get_available_providers()
    return [p for p in ('CUDAExecutionProvider', 'CPUExecutionProvider') if p in available]


def make_session(path: PathLike, threads: Optional[int] = None, providers: Optional[Sequence[str]] = None):
    """An ``onnxruntime.InferenceSession`` with every graph optimization, ``threads`` intra-op
    threads (default: torch's thread count) and one inter-op thread.

    Its threads stop spinning when a run ends (``session.force_spinning_stop``): an early-exit
    predictor runs two sessions in turn, and the coarse session's threads spinning on through the
    fine run took the cores from it."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only
    options.add_session_config_entry('session.force_spinning_stop', '1')
    return ort.InferenceSession(str(path), options, providers=list(providers or default_providers()))


def _check_io(session, names_in: Sequence[str], names_out: Sequence[str], what: str) -> None:
    got_in = [i.name for i in session.get_inputs()]
    got_out = [o.name for o in session.get_outputs()]
    if got_in != list(names_in) or got_out != list(names_out):
        raise ExportFolderError(f'{what} has inputs {got_in} and outputs {got_out}, expected {list(names_in)} '
                                f'and {list(names_out)}')


def _check_fine_fits_coarse(coarse, fine, num_classes: int, folder: Path) -> None:
    """The fine graph takes what the coarse graph gives (a fine graph of another model is refused at load,
    not at the first batch that goes on)."""
    given = {o.name: o.shape for o in coarse.get_outputs()}
    given[COARSE_INPUTS[0]] = coarse.get_inputs()[0].shape
    for item in fine.get_inputs():
        theirs = given.get(item.name)
        if theirs is None:
            continue
        for a, b in zip(item.shape[1:], theirs[1:]):
            if isinstance(a, int) and isinstance(b, int) and a != b or len(item.shape) != len(theirs):
                raise ExportFolderError(f'the fine graph in {folder} takes {item.name} of shape {item.shape}, the coarse '
                                        f'graph gives {theirs}: graphs of two different models')
    classes = fine.get_outputs()[0].shape[-1]
    if isinstance(classes, int) and classes != num_classes:
        raise ExportFolderError(f'the fine graph in {folder} gives {classes} classes, the coarse graph {num_classes}: '
                                'graphs of two different models')


class OnnxEarlyExit:
    """A CF model's export folder, run in onnxruntime with the model's early-exit contract.

    Args:
        folder: an export folder of ``export_onnx.py``.
        threads: intra-op threads of each session (default: torch's thread count).
        providers: onnxruntime execution providers (default: :func:`default_providers`).
        verify: check the graphs' SHA-256 against the manifest.

    Attributes:
        manifest: the folder's manifest; img_size_list, num_classes, flops (``[coarse, coarse + fine]``
        GFLOPs), pretrained_cfg (the data config, for ``datasets.eval_transform``).

    Raises:
        ExportFolderError: a missing or foreign graph, or a manifest that does not describe the graphs.
    """

    def __init__(self, folder: PathLike, threads: Optional[int] = None, providers: Optional[Sequence[str]] = None,
                 verify: bool = True) -> None:
        self.folder = Path(folder)
        self.manifest = manifest = read_manifest(self.folder)
        self.img_size_list = [int(v) for v in manifest['img_size_list']]
        self.num_classes = int(manifest['num_classes'])
        self.flops = [float(v) for v in manifest['gflops']]
        self.pretrained_cfg = dict(manifest['data_config'], architecture=manifest['model'])
        sessions = {}
        for stage, (names_in, names_out) in {'coarse': (COARSE_INPUTS, COARSE_OUTPUTS),
                                             'fine': (FINE_INPUTS, FINE_OUTPUTS)}.items():
            entry = manifest['graphs'].get(stage) if isinstance(manifest['graphs'], dict) else None
            if not isinstance(entry, dict) or entry.get('file') != GRAPH_FILES[stage]:
                raise ExportFolderError(f'{self.folder / MANIFEST_NAME} names no {stage} graph')
            path = self.folder / entry['file']
            if not path.is_file():
                raise ExportFolderError(f'the {stage} graph {path} is missing')
            if verify and sha256_file(path) != entry.get('sha256'):
                raise ExportFolderError(f'{path} is not the {stage} graph that {MANIFEST_NAME} describes '
                                        '(SHA-256 differs): a graph of another export or a modified file')
            try:
                session = make_session(path, threads, providers)
            except Exception as e:  # onnxruntime raises its own exception types for unreadable graphs
                raise ExportFolderError(f'onnxruntime cannot load {path}: {str(e).splitlines()[0]}') from None
            _check_io(session, names_in, names_out, f'the {stage} graph {path}')
            sessions[stage] = session
        self._coarse, self._fine = sessions['coarse'], sessions['fine']
        side = self.img_size_list[1]
        shape = self._coarse.get_inputs()[0].shape
        classes = self._coarse.get_outputs()[0].shape[-1]
        if list(shape[1:]) != [3, side, side] or classes != self.num_classes:
            raise ExportFolderError(
                f'the graphs take (B, {", ".join(map(str, shape[1:]))}) images and give {classes} classes, but '
                f'{MANIFEST_NAME} says (B, 3, {side}, {side}) and {self.num_classes} classes: a manifest of another model')
        _check_fine_fits_coarse(self._coarse, self._fine, self.num_classes, self.folder)
        self.providers = self._coarse.get_providers()

    # the evaluation loops call these on models
    def eval(self) -> 'OnnxEarlyExit':
        return self

    def __repr__(self) -> str:
        return (f'OnnxEarlyExit({str(self.folder)!r}, model={self.manifest["model"]}, '
                f'img_size_list={self.img_size_list}, providers={self.providers})')

    def _fine_images(self, x: Any) -> torch.Tensor:
        x_f = x[1] if isinstance(x, (list, tuple)) and len(x) == 2 else x  # [x_c, x_f]: the graph makes x_c
        side = self.img_size_list[1]
        if not isinstance(x_f, torch.Tensor) or x_f.dim() != 4 or tuple(x_f.shape[1:]) != (3, side, side):
            shape = tuple(x_f.shape) if isinstance(x_f, torch.Tensor) else type(x_f).__name__
            raise ValueError(f'expected the fine images as (B, 3, {side}, {side}), got {shape}')
        if not x_f.is_floating_point():  # as the model: normalized float images, not raw bytes
            raise ValueError(f'expected normalized floating-point images, got {x_f.dtype} (convert and normalize '
                             'them as datasets.eval_transform does)')
        return x_f

    def _run(self, x: Any, threshold: Optional[float]) -> Tuple[torch.Tensor, ...]:
        """(coarse_logits, fine_logits, exited, confidence, cls_attn) on the input's device."""
        x_f = self._fine_images(x)
        device = x_f.device
        if x_f.shape[0] == 0:  # no image: empty results, as the model gives (onnxruntime refuses a 0 batch)
            n = int(self.manifest['coarse_stage_size']) ** 2
            empty = torch.empty(0, self.num_classes, device=device)
            return (empty, empty.clone(), torch.empty(0, dtype=torch.bool, device=device),
                    torch.empty(0, device=device), torch.empty(0, n, device=device))
        images = x_f.detach().to('cpu', torch.float32).contiguous().numpy()
        logits, confidence, tokens, embeddings, cls_attn = self._coarse.run(None, {COARSE_INPUTS[0]: images})
        coarse_logits, confidence = torch.from_numpy(logits), torch.from_numpy(confidence)
        exited = exit_mask(confidence, threshold)
        go_on = torch.nonzero(~exited).squeeze(1)
        n = go_on.numel()
        if n == 0:
            fine_logits = coarse_logits
        else:
            feeds = (images, tokens, embeddings, cls_attn)
            if n < exited.numel():
                rows = go_on.numpy()
                feeds = tuple(np.ascontiguousarray(a[rows]) for a in feeds)
            fine_rows = torch.from_numpy(self._fine.run(None, dict(zip(FINE_INPUTS, feeds)))[0])
            fine_logits = fine_rows if n == exited.numel() else coarse_logits.index_copy(0, go_on, fine_rows)
        outs = (coarse_logits, fine_logits, exited, confidence, torch.from_numpy(cls_attn))
        return outs if device.type == 'cpu' else tuple(t.to(device) for t in outs)

    def forward_early_exit(self, x: Any, threshold: float) -> torch.Tensor:
        """(B, C): coarse logits where the coarse max-softmax is ``>= threshold``, fine logits elsewhere."""
        return self._run(x, threshold)[1]

    def forward_details(self, x: Any, threshold: Optional[float] = None) -> CFOutput:
        """As the model's ``forward_details``: None runs the fine stage (with selection) for every row."""
        coarse_logits, fine_logits, exited, confidence, cls_attn = self._run(x, threshold)
        k = int(self.manifest.get('num_informative', math.ceil(cls_attn.shape[1] / 2)))
        important, _ = rank_coarse_patches(cls_attn, k)
        grid = (int(self.manifest['coarse_stage_size']),) * 2
        return CFOutput(coarse_logits, fine_logits, exited, confidence, cls_attn, important,
                        fine_children(important, grid))
