"""Training: the flags (``args``), the builders and process set-up (``setup``), samplers (``samplers``),
one epoch and one evaluation pass (``engine``), the epoch loop (``loop``), checkpoints and resume
(``checkpointing``), the losses (``losses``: CF-ViT's; ``token_label_loss``: token labeling's)."""
