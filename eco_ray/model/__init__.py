"""The early-exit models (the Mask2Former segmenter and the Deformable DETR detector), their gates,
post-processing, weights on disk and measured cost."""
