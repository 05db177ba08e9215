"""IRN (Ahn, Cho, Kwak, CVPR 2019) as a refinement any method's CAMs can go through.

labels.py (confident regions, pair sets) -> affinity.py (a_ij from the boundary map, L_B) ->
displacement.py (L_D) -> model.py (two-branch ResNet) -> train.py (the loop) ->
random_walk.py (T = S^-1 A^beta, T^t) -> refine.py (pseudo masks). Settings: config.py.
"""

from methods.common.irn.config import PAPER, IRNConfig
from methods.common.irn.refine import irn_masks
from methods.common.irn.train import build_model, train_irn

__all__ = ["IRNConfig", "PAPER", "build_model", "irn_masks", "train_irn"]
