"""ipasdctl: train compact image classifiers with IPASD self-distillation, compare, report, export."""

__version__ = "0.1.0"
