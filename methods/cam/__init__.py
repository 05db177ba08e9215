"""The plain ViT CAM baseline (``cam``)."""

from methods.cam.method import CamBaseline, CamConfig

__all__ = ["CamBaseline", "CamConfig"]
