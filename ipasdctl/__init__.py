"""ipasdctl: train compact image classifiers with IPASD self-distillation, compare, report, export.

The Python API (api.py) is imported on first use, so `import ipasdctl` and the CLI's help stay light:

    from ipasdctl import train, tune, compare, prune, evaluate, export_onnx, bench, predict, load_model, Recipe
"""

from .version import __version__

_API = ("Prediction", "Recipe", "RunFolder", "bench", "compare", "evaluate", "export_onnx", "load_model",
        "load_recipe", "predict", "prune", "recipe_of", "train", "tune")


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'ipasdctl' has no attribute '{name}'")


def __dir__():
    return sorted([*globals(), *_API])


__all__ = list(_API)
