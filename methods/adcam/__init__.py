"""AD-CAM: attention-based class activation diffusion on a Conformer (paper 003)."""

from methods.adcam.method import ADCAM, ADCAMConfig

__all__ = ["ADCAM", "ADCAMConfig"]
