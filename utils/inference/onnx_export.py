"""Export of a CF model's two stages to ONNX: the graph files, optional int8, and the manifest.

An export folder holds ``coarse.onnx``, ``fine.onnx`` (see ``models.export`` for what goes in and
out of each) and ``manifest.json``: the model name, grid, class count, input sizes, the data
config (normalization, crop, interpolation), each stage's GFLOPs, the exporter and opset, and the
SHA-256 of each graph so that the runtime (``utils.inference.onnx_runtime``) can refuse a foreign graph.
Both graphs have a dynamic batch axis. The export is all or nothing: its files are built in a staging
folder and moved into place, the manifest last, so a folder with graphs but no manifest is an export
that was interrupted, and the next export replaces it; a complete one is never overwritten unless asked.

``export_graph`` is the one exporter call, also used for plain models (the benchmark's DeiT-S).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from datasets.transforms import data_config
from models.export import COARSE_INPUTS, COARSE_OUTPUTS, FINE_INPUTS, FINE_OUTPUTS, CoarseStageGraph, FineStageGraph
from utils.common.atomic import atomic_file
from utils.common.errors import BadInputError, OutputDirError
from utils.common.run_folder import RunLock, check_writable_dir
from utils.inference.flops import stage_gflops

__all__ = ['EXPORT_FORMAT', 'FORMAT_VERSION', 'MANIFEST_NAME', 'GRAPH_FILES', 'EXPORTERS', 'QUANTIZE_MODES',
           'DEFAULT_OPSET', 'ExportExistsError', 'export_graph', 'quantize_dynamic_bytes', 'export_early_exit',
           'STAGING_PREFIX', 'STAGING_SUFFIX']

_logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

EXPORT_FORMAT = 'cf-vit-onnx-early-exit'
FORMAT_VERSION = 1
MANIFEST_NAME = 'manifest.json'
GRAPH_FILES = {'coarse': 'coarse.onnx', 'fine': 'fine.onnx'}
#: ``dynamo``: ``torch.onnx.export(dynamo=True)`` (torch's supported exporter); ``torchscript``:
#: the older tracing exporter (``dynamo=False``), several times faster to run, same graphs' results.
EXPORTERS = ('dynamo', 'torchscript')
QUANTIZE_MODES = ('none', 'dynamic')
DEFAULT_OPSET = 18
#: The highest opset torch's TorchScript-based exporter writes (the dynamo exporter converts to any).
TORCHSCRIPT_MAX_OPSET = 20
#: Name of the folder an export is built in (inside the export folder) before its files move into place.
STAGING_PREFIX, STAGING_SUFFIX = '.export-', '.tmp'
#: Rows of the example batch the graphs are traced with (>1, so that the batch axis stays symbolic).
EXAMPLE_BATCH = 2


class ExportExistsError(OutputDirError):
    """The output folder already holds an export (message meant for a person)."""


@torch.no_grad()
def export_graph(module: nn.Module, example_inputs: Tuple[torch.Tensor, ...], input_names: Sequence[str],
                 output_names: Sequence[str], exporter: str = 'dynamo', opset: int = DEFAULT_OPSET) -> bytes:
    """Serialized ONNX model of ``module(*example_inputs)``, every input and output batch-dynamic (axis 0)."""
    if exporter not in EXPORTERS:
        raise ValueError(f'unknown exporter {exporter!r}: use one of {", ".join(EXPORTERS)}')
    module.eval()
    if exporter == 'dynamo':
        batch = torch.export.Dim('batch', min=1)
        program = torch.onnx.export(
            module, tuple(example_inputs), None, input_names=list(input_names), output_names=list(output_names),
            dynamic_shapes=tuple({0: batch} for _ in example_inputs), opset_version=opset, dynamo=True,
            external_data=False, verbose=False)
        return program.model_proto.SerializeToString()
    if opset > TORCHSCRIPT_MAX_OPSET:
        raise BadInputError(f'--opset {opset}: the torchscript exporter writes opsets up to {TORCHSCRIPT_MAX_OPSET} '
                            f'(the default is {DEFAULT_OPSET})')
    buffer = io.BytesIO()
    axes = {name: {0: 'batch'} for name in (*input_names, *output_names)}
    try:
        torch.onnx.export(module, tuple(example_inputs), buffer, input_names=list(input_names),
                          output_names=list(output_names), dynamic_axes=axes, opset_version=opset, dynamo=False)
    except torch.onnx.OnnxExporterError as e:  # an operator the chosen (old) opset lacks
        said = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BadInputError(f'--opset {opset}: {said} (the default is {DEFAULT_OPSET})') from e
    return buffer.getvalue()


def quantize_dynamic_bytes(model_bytes: bytes) -> bytes:
    """onnxruntime's dynamic int8 quantization of the linear layers (MatMul/Gemm weights) of a graph."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    proto = onnx.load_from_string(model_bytes)
    # the dynamo exporter's intermediate shape annotations trip onnx's shape inference, which the
    # quantizer runs: drop them (the graph's inputs and outputs keep theirs) and let it infer afresh
    del proto.graph.value_info[:]
    with tempfile.TemporaryDirectory(prefix='cfvit-quant-') as tmp:
        src, dst = Path(tmp) / 'float.onnx', Path(tmp) / 'int8.onnx'
        src.write_bytes(proto.SerializeToString())
        quantize_dynamic(src, dst, op_types_to_quantize=['MatMul', 'Gemm'], weight_type=QuantType.QInt8)
        return dst.read_bytes()


def _versions(exporter: str, opset: int) -> Dict[str, Any]:
    import onnx
    import onnxruntime
    out = {'name': f'torch.onnx.export (dynamo={exporter == "dynamo"})', 'exporter': exporter, 'opset': opset,
           'torch': torch.__version__, 'onnx': onnx.__version__, 'onnxruntime': onnxruntime.__version__}
    if exporter == 'dynamo':
        import onnxscript
        out['onnxscript'] = onnxscript.__version__
    return out


def export_early_exit(model: nn.Module, out_dir: PathLike, exporter: str = 'dynamo', opset: int = DEFAULT_OPSET,
                      quantize: str = 'none', overwrite: bool = False,
                      extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Write the two stage graphs of ``model`` and their manifest into ``out_dir``.

    Args:
        model: a CF model (any grid, CF-DeiT or CF-LV-ViT); it is put in eval mode.
        out_dir: the export folder (created if needed).
        exporter: one of :data:`EXPORTERS`.
        opset: ONNX opset.
        quantize: ``'none'`` or ``'dynamic'`` (int8 weights of the linear layers, see
            :func:`quantize_dynamic_bytes`).
        overwrite: replace an export already in ``out_dir`` (refused otherwise).
        extra: more manifest entries (e.g. the source checkpoint).

    Returns:
        The manifest.

    Raises:
        utils.common.errors.OutputDirError: ``out_dir`` cannot be written. ExportExistsError: it already holds
        an export and ``overwrite`` is False. ValueError: an unknown exporter or quantization.
    """
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f'unknown quantization {quantize!r}: use one of {", ".join(QUANTIZE_MODES)}')
    if exporter not in EXPORTERS:
        raise ValueError(f'unknown exporter {exporter!r}: use one of {", ".join(EXPORTERS)}')
    out = check_writable_dir(out_dir)
    with RunLock(out):  # one export at a time per folder: a second run is refused, not silently mixed in
        return _export_locked(model, out, exporter, opset, quantize, overwrite, extra)


def _clear_for_export(out: Path, overwrite: bool) -> None:
    """Refuse a complete export (its manifest is there) unless ``overwrite``; remove what an interrupted one
    left (graphs without a manifest, staging folders): the manifest is written last, so without it the graphs
    are no export. Links are removed, never followed."""
    for entry in out.iterdir():
        if entry.name.startswith(STAGING_PREFIX) and entry.name.endswith(STAGING_SUFFIX):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            _logger.warning('removed %s, left by an export that was interrupted', entry)
    present = [n for n in (MANIFEST_NAME, *GRAPH_FILES.values()) if os.path.lexists(out / n)]
    if os.path.lexists(out / MANIFEST_NAME):
        if not overwrite:
            raise ExportExistsError(f'{out} already holds {", ".join(present)}: choose another folder or pass '
                                    '--overwrite')
    elif present:
        for name in present:
            path = out / name
            if path.is_dir() and not path.is_symlink():
                raise ExportExistsError(f'{path} is a folder, not a graph of an export: move it away')
            path.unlink()
        _logger.warning('%s held %s without %s: an export that was interrupted before it finished; replacing it',
                        out, ', '.join(present), MANIFEST_NAME)


def _publish(out: Path, files: Dict[str, bytes]) -> None:
    """Write ``files`` into a staging folder inside ``out``, then move them into place, the manifest last (and
    an old manifest removed first): a failure while writing (a full disk) leaves ``out`` as it was, and a
    crash while moving leaves graphs without a manifest, which the next export recognises and replaces."""
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, suffix=STAGING_SUFFIX, dir=out))
    try:
        for name, data in files.items():
            with atomic_file(staging / name) as f:
                f.write(data)
        if os.path.lexists(out / MANIFEST_NAME):  # --overwrite: from here on the old export is incomplete
            os.unlink(out / MANIFEST_NAME)
        for name in sorted(files, key=lambda n: n == MANIFEST_NAME):  # the manifest last: it completes the export
            os.replace(staging / name, out / name)
        dir_fd = os.open(out, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _export_locked(model: nn.Module, out: Path, exporter: str, opset: int, quantize: str, overwrite: bool,
                   extra: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    _clear_for_export(out, overwrite)
    model.eval()
    coarse_side, fine_side = model.img_size_list
    x = torch.randn(EXAMPLE_BATCH, 3, fine_side, fine_side, generator=torch.Generator().manual_seed(0))
    x = x.to(next(model.parameters()).device)
    coarse, fine = CoarseStageGraph(model).to(x.device), FineStageGraph(model)
    with torch.no_grad():
        state = coarse(x)[2:]
    graphs = {
        'coarse': export_graph(coarse, (x,), COARSE_INPUTS, COARSE_OUTPUTS, exporter, opset),
        'fine': export_graph(fine, (x, *state), FINE_INPUTS, FINE_OUTPUTS, exporter, opset),
    }
    if quantize == 'dynamic':
        graphs = {k: quantize_dynamic_bytes(v) for k, v in graphs.items()}
    flops = stage_gflops(model)
    cfg = data_config(model)
    manifest: Dict[str, Any] = {
        'format': EXPORT_FORMAT, 'format_version': FORMAT_VERSION,
        'model': model.pretrained_cfg.get('architecture', type(model).__name__) if hasattr(model, 'pretrained_cfg')
        else type(model).__name__,
        'coarse_stage_size': model.coarse_grid[0], 'patch_size': model.patch_size,
        'img_size_list': list(model.img_size_list), 'num_classes': model.num_classes, 'embed_dim': model.embed_dim,
        'num_coarse_tokens': model.coarse_grid[0] * model.coarse_grid[1], 'num_informative': model.num_informative,
        'data_config': {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        'gflops': flops, 'stage_gflops': {'coarse': flops[0], 'fine': flops[1] - flops[0]},
        'exporter': _versions(exporter, opset), 'quantize': quantize,
        'graphs': {}, **(extra or {}),
    }
    names = {'coarse': (COARSE_INPUTS, COARSE_OUTPUTS), 'fine': (FINE_INPUTS, FINE_OUTPUTS)}
    for stage, data in graphs.items():
        manifest['graphs'][stage] = {
            'file': GRAPH_FILES[stage], 'sha256': hashlib.sha256(data).hexdigest(), 'bytes': len(data),
            'inputs': list(names[stage][0]), 'outputs': list(names[stage][1])}
    files = {GRAPH_FILES[stage]: data for stage, data in graphs.items()}
    files[MANIFEST_NAME] = (json.dumps(manifest, indent=2) + '\n').encode()
    _publish(out, files)
    return manifest
