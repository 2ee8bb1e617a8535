"""What every script has in common: errors, exit codes and their one-line messages (``errors``), atomic writes
(``atomic``), checkpoints (``checkpoint``, ``checkpoint_schema``), flag types and ``KEY=VALUE`` parsing
(``flags``), log lines (``logs``), the entry point that turns what ends a run into an exit status
(``entry``), output folders and their locks (``run_folder``), stop signals (``signals``) and what runs
before the imports (``startup``), processes (``dist``), precision (``precision``), the model a checkpoint holds (``model_builder``).
Files and structures from outside are read through ``datasets.safe_read``."""
