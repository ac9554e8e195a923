"""eco-ray: ECO-M2F early-exit Mask2Former as a Ray pipeline."""

__version__ = "0.1.0"
