import pytest

from eco_ray.data.synth import SynthConfig, write_dataset


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A small generated dataset shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, SynthConfig(size=64, seed=3), {"train": 48, "val": 16}, workers=2)
    return root
