import sys

from eco_ray.cli import main

sys.exit(main())
