"""Every name, module and console script the README documents exists: the public API survives refactoring."""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import shutil

import pytest

from conftest import REPO

README = (REPO / "README.md").read_text()
IMPORTS = sorted({(module, name.strip()) for module, names in re.findall(r"from (moelora_ds[\w.]*) import ([\w, ]+)",
                                                                         README) for name in names.split(",")})
MODULES = sorted(set(re.findall(r"python -m (moelora_ds[\w.]+)", README)))
BACKTICKED = sorted(set(re.findall(r"`(\w+)\(", README.split("## Python API")[1].split("## Training")[0])))


def test_the_readme_documents_an_api():
    assert len(IMPORTS) >= 5 and MODULES and len(BACKTICKED) >= 4


@pytest.mark.parametrize("module,name", IMPORTS)
def test_documented_import(module, name):
    assert hasattr(importlib.import_module(module), name), f"README: from {module} import {name}"


@pytest.mark.parametrize("name", BACKTICKED)
def test_python_api_section_names_exported_callables(name):
    import moelora_ds

    assert callable(getattr(moelora_ds, name, None)), f"README Python API: moelora_ds.{name}"


@pytest.mark.parametrize("module", MODULES)
def test_documented_module_is_runnable(module):
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin.endswith(".py"), module


def test_console_scripts_are_declared_installed_and_point_at_the_cli():
    import tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert declared == {"moelora-train": "moelora_ds.cli:train_command", "moelora-eval": "moelora_ds.cli:eval_command",
                        "moelora-export": "moelora_ds.cli:export_main",
                        "moelora-prepare": "moelora_ds.cli:prepare_main"}
    installed = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")
                 if ep.name.startswith("moelora-")}
    assert installed and all(declared.get(name) == target and shutil.which(name) for name, target in installed.items())
    for target in declared.values():
        module, attribute = target.split(":")
        assert callable(getattr(importlib.import_module(module), attribute)), target
