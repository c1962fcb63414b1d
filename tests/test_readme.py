"""The documented examples are the tested ones: docs/your-own-network.md's code is tests/networks/residual.py verbatim,
and the README stays a newcomer's page."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(__file__))


def test_the_documented_example_network_is_the_tested_file():
    doc = open(os.path.join(ROOT, "docs", "your-own-network.md")).read()
    example = open(os.path.join(ROOT, "tests", "networks", "residual.py")).read()
    assert f"```python\n{example}```" in doc


def test_the_readme_is_short_and_every_page_it_links_exists():
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert len(readme.splitlines()) <= 200
    for target in re.findall(r"\]\(([^)#]+)\)", readme):
        if not target.startswith("http"):
            assert os.path.exists(os.path.join(ROOT, target)), target
