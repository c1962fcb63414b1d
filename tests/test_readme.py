"""The documented examples are the tested ones: docs/your-own-network.md's code is tests/networks/residual.py verbatim,
docs/schedule.md shows what the schedule printer prints, and the README stays a newcomer's page."""

import os
import re

from pipeline.cli import main

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


def test_the_documented_schedules_are_what_the_printer_prints(capsys):
    doc = open(os.path.join(ROOT, "docs", "schedule.md")).read()
    shown = re.findall(r"```\n\$ python -m pipeline (schedule [^\n]*)\n(.*?)```", doc, re.S)
    assert len(shown) == 3  # 1.5,2.5; 1.5h,2.5; DFA
    for command, output in shown:
        assert main(command.split()) == 0
        assert capsys.readouterr().out == output, command
