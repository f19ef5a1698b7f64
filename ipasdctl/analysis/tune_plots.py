"""The plots of a tuning study: Optuna's own matplotlib visualisations (optimisation history, parameter
importances, intermediate values), saved as PNG. Takes an Optuna study; knows nothing of how it was run."""

from __future__ import annotations

import warnings
from pathlib import Path

from ..errors import one_line
from .plots import save_figure

PLOTS = {
    "optimization_history": "plot_optimization_history",
    "param_importances": "plot_param_importances",
    "intermediate_values": "plot_intermediate_values",
}


def write_study_plots(study, folder: Path) -> tuple[list[Path], list[str]]:
    """The plots written into `folder`, and one note per plot the study cannot draw yet (importances need two
    complete trials that differ)."""
    import matplotlib

    matplotlib.use("Agg")  # Optuna draws through pyplot: never a window
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    folder.mkdir(parents=True, exist_ok=True)
    written, skipped = [], []
    for name, function in PLOTS.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib backend experimental
                axes = getattr(optuna_plots, function)(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            skipped.append(f"{name}: {one_line(exc, 120)}")
            continue
        axes = axes.flat[0] if hasattr(axes, "flat") else axes
        figure = axes.figure
        figure.set_size_inches(7, 4.5)
        figure.tight_layout()
        written.append(save_figure(figure, folder / f"{name}.png"))
        plt.close(figure)
    return written, skipped
