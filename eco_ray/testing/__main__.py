"""``python -m eco_ray.testing``: a loopback Ray cluster by hand (scripts/loopback-cluster)."""

import sys

from eco_ray.testing.loopback_cluster import main

sys.exit(main())
