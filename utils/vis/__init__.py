"""Pictures: the visualization figures (``figures``) and the budgeted-accuracy plot (``plots``)."""
