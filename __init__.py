"""flywheel: a self-improvement data flywheel for language models (generate → judge → curate → train → benchmark)."""

__version__ = "0.1.0"
