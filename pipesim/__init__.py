"""pipesim: predict, and prove, how fast pipeline-parallel training runs."""

__version__ = "0.1.0"
