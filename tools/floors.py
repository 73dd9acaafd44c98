"""Print pyproject.toml's dependencies with every `>=` floor pinned exactly (`make test-min`)."""

import re
import sys

try:
    import tomllib
except ImportError:  # Python 3.10: pip carries the same parser
    from pip._vendor import tomli as tomllib

project = tomllib.load(open(sys.argv[1], "rb"))["project"]
for requirement in project["dependencies"]:
    name, floor = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*>=\s*([^,;\s]+).*", requirement).groups()
    print(f"{name}=={floor}")
