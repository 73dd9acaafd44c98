"""What a non-editable install of labsupport contains, and the floors the tests run against."""

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_wheel_contains_every_subpackage(tmp_path):
    src = tmp_path / "src"  # a copy, so that the build leaves nothing in the clone
    shutil.copytree(ROOT / "labsupport", src / "labsupport",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path), str(src)], check=True)
    [wheel] = tmp_path.glob("labsupport-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = [p.parent.relative_to(ROOT).as_posix()
                for p in (ROOT / "labsupport").rglob("__init__.py")]
    assert "labsupport/quant" in packages
    for package in packages:
        assert f"{package}/__init__.py" in names, f"{package} is missing from the wheel"


def test_every_pinned_requirement_meets_its_floor():
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)$",
                           (ROOT / "requirements.txt").read_text(), re.M))
    floors = subprocess.run([sys.executable, str(ROOT / "tools" / "floors.py"),
                             str(ROOT / "pyproject.toml")], capture_output=True, text=True,
                            check=True).stdout.split()
    assert floors
    for line in floors:
        name, floor = line.split("==")
        assert name in pins, f"{name} has a floor in pyproject.toml but no pin"
        as_tuple = [tuple(int(x) for x in re.findall(r"\d+", v)[:3]) for v in (pins[name], floor)]
        assert as_tuple[0] >= as_tuple[1], f"{name}: pin {pins[name]} is below floor {floor}"
