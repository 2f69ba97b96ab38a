"""Test-suite set-up: the ``slow`` marker and JAX's persistent compilation cache.

``python -m pytest -m "not slow"`` is the quick loop for development (a few
minutes on 2 cores); CI runs everything. End-to-end runs (pipelines, the CLI,
notebooks, subprocesses) are slow: marked here for files whose tests are
marked nowhere else.
"""

import pytest

from jaxprune import compilation_cache

# Compiled programs are shared by every test process and CLI subprocess of a
# run, and by the next run (``JAXPRUNE_CACHE_DIR`` moves the cache or turns it off).
compilation_cache.enable()

# End-to-end tests in files that do not mark them themselves (node-id prefixes), and the
# larger-model cases of a test whose ResNet-20 case stays in the quick loop.
SLOW = (
  'tests/test_chipnet.py::test_quick_run_meets_budget_after_slimming_and_beats_chance',
  'tests/test_chipnet.py::test_transfer_masks_to_mnist',
  'tests/test_ftwt.py::test_pipeline_end_to_end',
  'tests/test_ftwt.py::test_gated_equals_each_samples_slimmed_network[vgg16]',
  'tests/test_ftwt.py::test_gated_equals_each_samples_slimmed_network[mobilenet_v1_cifar]',
  'tests/test_magnitude.py::test_pipeline_end_to_end',
  'tests/test_colabs.py::',
  'tests/test_training.py::test_one_vs_four_devices_same_loss',
  'tests/test_training.py::test_two_processes_match_one_device',
  'tests/test_training.py::test_learns_on_shipped_cifar_subset',
)


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: end-to-end (pipelines, CLI, notebooks); skipped by -m "not slow"')


def pytest_collection_modifyitems(config, items):
  for item in items:
    if item.nodeid.startswith(SLOW):
      item.add_marker(pytest.mark.slow)
