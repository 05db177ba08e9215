"""WeakTr: plain-ViT CAM generation with adaptive attention fusion, and online retraining with
a gradient-clipping decoder (Zhu et al., TIP 2023). Registered as ``weaktr``."""

from methods.weaktr.method import WeakTr, WeakTrConfig

__all__ = ["WeakTr", "WeakTrConfig"]
