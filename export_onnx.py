"""Export a CF-ViT checkpoint for deployment: its two stages as ONNX graphs, run with early exit in onnxruntime.

    python export_onnx.py --checkpoint_path CKPT [--model cf_deit_small] [--coarse-stage-size 7] \
        [--output-dir DIR] [--quantize dynamic]

Writes DIR/coarse.onnx (fine images in; coarse logits, confidence and the coarse state out),
DIR/fine.onnx (the rows that go on: fine images and coarse state in, fine logits out) and
DIR/manifest.json (model, grid, classes, sizes, normalization, GFLOPs per stage, exporter and
opset). Both graphs take any batch size. The exported pair is then checked against the PyTorch
model on a random batch. Run it with ``utils.inference.onnx_runtime.OnnxEarlyExit`` or
``dynamic_inference.py --backend onnxruntime DIR``.

Any checkpoint the other scripts accept works: the released layout, a training checkpoint (which
names its architecture), any grid, CF-DeiT and CF-LV-ViT.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

import utils.common.startup  # noqa: F401  (first, before torch and timm: HF_HUB_OFFLINE, stop signals)

import torch

import models
from utils.common.checkpoint import load_checkpoint_file
from utils.common.entry import run_entry_point
from utils.common.errors import EXIT_BAD_INPUT, BadInputError  # noqa: F401 (export_onnx.EXIT_BAD_INPUT)
from utils.common.flags import grid_side, int_at_least
from utils.common.logs import setup_logging
from utils.common.model_builder import build_from_checkpoint
from utils.common.run_folder import refuse_overwriting_inputs
from utils.inference.onnx_export import (
    DEFAULT_OPSET, EXPORTERS, GRAPH_FILES, MANIFEST_NAME, QUANTIZE_MODES, export_early_exit,
)
from utils.inference.onnx_runtime import OnnxEarlyExit

_logger = logging.getLogger('export_onnx')


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser('CF-ViT ONNX export', formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=__doc__)
    p.add_argument('--checkpoint-path', '--checkpoint_path', dest='checkpoint_path', required=True)
    p.add_argument('--checkpoint-key', default=None,
                   help="checkpoint entry holding the weights (default: 'model', else the whole file); e.g. model_ema")
    p.add_argument('--model', default=None, choices=models.MODEL_NAMES,
                   help='the model (default: the one a training checkpoint records, else cf_deit_small)')
    p.add_argument('--coarse-stage-size', '--coarse_stage_size', type=grid_side, default=None,
                   help='coarse grid side g (default: what a training checkpoint records, else 7)')
    p.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                   help='extra timm.create_model arguments (KEY=VALUE ... or one JSON object)')
    p.add_argument('--output-dir', '--output_dir', default=None,
                   help='export folder (default: output/onnx/<model>_g<g>[_int8])')
    p.add_argument('--overwrite', action='store_true', help='replace an export already in --output-dir')
    p.add_argument('--quantize', choices=QUANTIZE_MODES, default='none',
                   help="'dynamic': int8 weights of the linear layers (onnxruntime's dynamic quantization)")
    p.add_argument('--exporter', choices=EXPORTERS, default='dynamo',
                   help='torch.onnx.export with dynamo=True (default) or the older tracing exporter (faster to run)')
    p.add_argument('--opset', type=int_at_least(7), default=DEFAULT_OPSET,
                   help=f'ONNX opset (default {DEFAULT_OPSET}; at least 7, at most 20 with --exporter torchscript)')
    p.add_argument('--unsafe-load', action='store_true',
                   help='allow checkpoints that hold arbitrary Python objects (runs code from the file: trusted files only)')
    return p


def run(args: argparse.Namespace) -> dict:
    checkpoint = load_checkpoint_file(args.checkpoint_path, unsafe=args.unsafe_load)
    if not isinstance(checkpoint, dict):
        raise BadInputError(f'{args.checkpoint_path} does not hold a dict checkpoint')
    model, name, g = build_from_checkpoint(checkpoint, args.model, args.coarse_stage_size, args.model_kwargs,
                                           args.checkpoint_key)
    model.eval()
    suffix = '_int8' if args.quantize == 'dynamic' else ''
    out = Path(args.output_dir or Path('output') / 'onnx' / f'{name}_g{g}{suffix}')
    refuse_overwriting_inputs([out / n for n in (MANIFEST_NAME, *GRAPH_FILES.values())], [args.checkpoint_path],
                              BadInputError)
    _logger.info('exporting %s (%dx%d coarse grid, %d classes) with %s, opset %d, into %s',
                 name, g, g, model.num_classes, args.exporter, args.opset, out)
    manifest = export_early_exit(model, out, exporter=args.exporter, opset=args.opset, quantize=args.quantize,
                                 overwrite=args.overwrite, extra={'checkpoint': os.path.abspath(args.checkpoint_path)})
    # check the pair against the model on a random batch (every row through both stages)
    runtime = OnnxEarlyExit(out)
    side = model.img_size_list[1]
    x = torch.randn(4, 3, side, side, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.forward_details(x)
    got = runtime.forward_details(x)
    diff = [float((a - b).abs().max()) for a, b in ((got.coarse_logits, ref.coarse_logits),
                                                    (got.fine_logits, ref.fine_logits))]
    same_top1 = bool(torch.equal(got.fine_logits.argmax(1), ref.fine_logits.argmax(1)))
    _logger.info('GFLOPs of one image: coarse %.4f, coarse + fine %.4f', *manifest['gflops'])
    _logger.info('check on 4 random images: max |logits - PyTorch| coarse %.2e, fine %.2e; same top-1: %s',
                 diff[0], diff[1], same_top1)
    _logger.info('wrote %s (coarse.onnx, fine.onnx, manifest.json)', out)
    return manifest


def _drop_quantizer_advice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith('Please consider to run pre-processing before quantization')


def quiet_exporter_logs() -> None:
    """Our own progress lines only: the exporter's graph optimizer (onnxscript, onnx_ir) and onnxruntime's
    quantizer log hundreds of INFO lines per graph ('Removed 87 unused nodes', 'Replaced initializer ...')
    through the root logger, and torch warns that the two batch axes share one name (they do, on purpose).
    Their warnings and errors still show."""
    setup_logging(level=logging.WARNING, stream=sys.stdout, style='plain', if_unconfigured=True)
    _logger.setLevel(logging.INFO)
    for handler in logging.getLogger().handlers:  # onnxruntime's quantizer advises its pre-processing once per
        handler.addFilter(_drop_quantizer_advice)  # graph through the root logger; the graphs are already shaped
    warnings.filterwarnings('ignore', message=r'.*The axis name: .* will not be used')
    # --exporter torchscript: the traced Python conditions are checks of the input's spatial size, which is
    # fixed per model; the batch axis stays dynamic, and the pair is checked against PyTorch below
    warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    quiet_exporter_logs()
    # SIGINT / SIGTERM: one line, exit 130 / 143; a folder this run created and left empty is removed
    return run_entry_point(lambda: run(args), 'export_onnx.py', writing='cannot write the export', one_line=True)


if __name__ == '__main__':
    sys.exit(main())
