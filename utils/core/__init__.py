"""What every script needs: errors and exit codes (``errors``), atomic files (``files``), checkpoints
(``checkpoint``, ``checkpoint_schema``), flags, logging and the entry point (``cli``), output folders
(``run_folder``), stop signals (``signals``), processes (``dist``), the model a checkpoint holds
(``model_builder``), files and structures from outside checked before use (``safe_io``, over
``datasets.safe_read``)."""
