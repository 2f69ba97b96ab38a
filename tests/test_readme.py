"""The README's core example runs and says what it claims."""

import pathlib
import re

import numpy as np


def test_readme_core_example_runs():
  text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
  code = re.search(r"## The core in a few lines\n\n```python\n(.*?)```", text, re.S).group(1)
  ns: dict = {}
  exec(compile(code, "README.md", "exec"), ns)
  # What the comments claim: literature counts and masked == slimmed.
  assert abs(float(ns["c"].macs) - 125.5e6) / 125.5e6 < 0.01
  assert abs(float(ns["c"].params) - 0.85e6) / 0.85e6 < 0.01
  np.testing.assert_allclose(np.asarray(ns["small_model"](ns["x"])), np.asarray(ns["y"]), atol=1e-4)
