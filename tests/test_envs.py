"""The conda env that rules declare must pin exactly what the pip install pins."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _pins(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[name.strip().lower()] = version.strip()
    return out


def test_conda_env_matches_requirements():
    req = _pins((ROOT / "requirements.txt").read_text().splitlines())
    constraints = _pins((ROOT / "constraints.txt").read_text().splitlines())
    env = yaml.safe_load((ROOT / "envs" / "hemexp.yaml").read_text())
    pip_block = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    conda_pins = _pins(pip_block)
    assert conda_pins == {**req, **constraints}


def test_torch_is_constrained_and_first():
    assert _pins((ROOT / "constraints.txt").read_text().splitlines()) == {"torch": "2.13.0"}
    makefile = (ROOT / "Makefile").read_text()
    assert makefile.index("pip install --quiet torch==2.13.0") < makefile.index("-r requirements.txt")
    assert "-c constraints.txt -r requirements.txt" in makefile


def test_no_torchvision_in_main_env():
    for text in ((ROOT / "requirements.txt").read_text(), (ROOT / "envs" / "hemexp.yaml").read_text()):
        assert "torchvision" not in text and "lpips" not in text
