"""Helpers for exercising eco-ray against real infrastructure on one machine (tests and drills)."""

from eco_ray.testing.loopback_cluster import ClusterUnavailable, LoopbackCluster

__all__ = ["ClusterUnavailable", "LoopbackCluster"]
