"""Sphinx configuration for the proxyframe documentation."""

import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# autodoc imports proxyframe from this checkout (Twisted must be installed).
sys.path.insert(0, str(ROOT))

with open(ROOT / "pyproject.toml", "rb") as f:
    release = tomllib.load(f)["project"]["version"]

project = "proxyframe"
author = "the proxyframe authors"
version = release
extensions = ["sphinx.ext.autodoc"]
autodoc_member_order = "bysource"
exclude_patterns = ["_build"]
html_theme = "alabaster"
