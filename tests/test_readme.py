"""The README's examples are the tested ones: its "Your own network" code is tests/networks/residual.py verbatim."""

import os

ROOT = os.path.dirname(os.path.dirname(__file__))


def test_the_readme_example_network_is_the_tested_file():
    readme = open(os.path.join(ROOT, "README.md")).read()
    example = open(os.path.join(ROOT, "tests", "networks", "residual.py")).read()
    assert f"```python\n{example}```" in readme
