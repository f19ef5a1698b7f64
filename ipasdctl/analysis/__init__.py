"""Analysis: evaluation of runs and exported models, metrics, selection, report assembly and its plots
(matplotlib lives only in plots.py). Reads run folders through runs.py; imports nothing of training or methods."""
