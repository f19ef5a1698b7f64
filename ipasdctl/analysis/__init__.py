"""Analysis: evaluation of runs and exported models, metrics, selection, report assembly and its plots
(matplotlib lives only in plots.py). Reads run and comparison folders through runs/; imports nothing of
training, methods or studies."""
