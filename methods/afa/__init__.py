"""AFA / PAR (``afa``): affinity from attention + pixel-adaptive refinement, end to end."""

from methods.afa.method import AFA, AFAConfig

__all__ = ["AFA", "AFAConfig"]
