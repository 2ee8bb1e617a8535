"""Inference: the evaluation loop of both stages (``predict``), early exit (``early_exit``), FLOPs
(``flops``), CPU precision and allocator (``cpu``), ONNX export (``onnx_export``) and runtime
(``onnx_runtime``)."""
