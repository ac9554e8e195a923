"""The early-exit Mask2Former, its gates, post-processing, weights on disk and measured cost."""
