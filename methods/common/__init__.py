"""Building blocks shared by several methods (backbones, dense CRF, training utilities)."""
