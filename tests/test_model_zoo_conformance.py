"""The MONAI Model Zoo's bundle checks, replayed offline against ``bundle/``.

The Zoo's CI (``ci/verify_bundle.py``, ``ci/run_premerge_cpu.sh`` and its pre-commit hooks) requires: a ``LICENSE``
and ``configs/metadata.json``; ``models/model.pt`` and ``configs/inference.{json,yaml}``; a ``version`` present in
``changelog``; metadata valid against the schema; weights in the bundle under 25 MB or listed in ``large_files.yml``;
files added to the repository under 1 MB otherwise; pretty-printed JSON, parseable YAML, a newline at the end of
files and no trailing whitespace; module docstrings first; flake8-style code checks. Its README template has the
sections Authors, Tags, Model Description, Data, Preprocessing, Performance, System Configuration, Limitations,
Citation, References; data with terms of use needs ``docs/data_license.txt``. ``verify_net_in_out`` on
``network_def`` and the TorchScript export are in ``test_bundle_config.py``. Each rule fails with its name.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import BUNDLE, REPO
from monai.bundle import verify_metadata

SCHEMA = REPO.parent / "shared" / "schema" / "meta_schema_20240725.json"
WEIGHT_LIMIT_BYTES = 25 * 1024 * 1024  # weights committed to the Zoo; larger ones go to large_files.yml
FILE_LIMIT_BYTES = 1024 * 1024  # pre-commit check-added-large-files --maxkb=1024 for everything else
README_SECTIONS = (
    "Authors",
    "Tags",
    "Model Description",
    "Data",
    "Preprocessing",
    "Performance",
    "System Configuration",
    "Limitations",
    "Citation",
    "References",
)
TEXT_SUFFIXES = (".py", ".json", ".yaml", ".yml", ".md", ".txt", ".conf", ".cfg")


def _bundle_files() -> list[str]:
    """Files of the bundle as committed (git), relative to ``bundle/``; outputs of local runs are not part of it."""
    listed = subprocess.run(["git", "ls-files", "bundle"], cwd=REPO, capture_output=True, text=True, check=True)
    return [os.path.relpath(line, "bundle") for line in listed.stdout.splitlines() if line]


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def rule_necessary_files() -> list[str]:
    return [f"{name} is missing" for name in ("LICENSE", "configs/metadata.json") if not (BUNDLE / name).is_file()]


def rule_preferred_files() -> list[str]:
    problems = [] if (BUNDLE / "models" / "model.pt").is_file() else ["models/model.pt is missing"]
    if not any((BUNDLE / "configs" / f"inference.{suffix}").is_file() for suffix in ("json", "yaml")):
        problems.append("configs/inference.json or .yaml is missing (MONAI Label does not read .yml)")
    return problems


def rule_version_in_changelog() -> list[str]:
    metadata = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    version, changelog = metadata.get("version"), metadata.get("changelog", {})
    if version not in changelog:
        return [f"version {version} has no changelog entry"]
    newest = max(changelog, key=_version_key)
    return [] if newest == version else [f"version {version} is older than changelog entry {newest}"]


def rule_metadata_schema() -> list[str]:
    if not SCHEMA.is_file():
        pytest.skip(f"the Model Zoo schema is not at {SCHEMA} (put shared/ beside the repository)")
    try:
        verify_metadata(meta_file=str(BUNDLE / "configs" / "metadata.json"), filepath=str(SCHEMA))
    except Exception as error:  # noqa: BLE001 - jsonschema raises its own ValidationError
        return [f"metadata.json does not validate: {error}"]
    return []


def rule_file_sizes() -> list[str]:
    problems = []
    for name in _bundle_files():
        size = (BUNDLE / name).stat().st_size
        is_weight = name.startswith("models/") and name.endswith((".pt", ".ts", ".pth", ".onnx"))
        limit = WEIGHT_LIMIT_BYTES if is_weight else FILE_LIMIT_BYTES
        if size > limit:
            problems.append(f"{name} is {size / 2**20:.1f} MiB, over {limit / 2**20:.0f} MiB")
    return problems


def rule_large_files_listed() -> list[str]:
    problems = []
    for name in ("large_files.yml", "large_files.yaml", "large_files.json"):
        if (BUNDLE / name).is_file():
            content = yaml.safe_load((BUNDLE / name).read_text()) or {}
            for entry in content.get("large_files", []):
                missing = [key for key in ("path", "url", "hash_val", "hash_type") if not entry.get(key)]
                if missing:
                    problems.append(f"{name} entry {entry.get('path')} lacks {missing}")
    return problems


def rule_readme_sections() -> list[str]:
    readme = (BUNDLE / "docs" / "README.md").read_text()
    headings = {re.sub(r"[*#]", "", line).strip() for line in readme.splitlines() if line.startswith("#")}
    return [f"docs/README.md has no '{section}' section" for section in README_SECTIONS if section not in headings]


def rule_data_license() -> list[str]:
    path = BUNDLE / "docs" / "data_license.txt"
    return [] if path.is_file() and path.read_text().strip() else ["docs/data_license.txt is missing or empty"]


def rule_file_format() -> list[str]:
    problems = []
    for name in _bundle_files():
        path = BUNDLE / name
        if not name.endswith(TEXT_SUFFIXES) and name != "LICENSE":
            continue
        text = path.read_text()
        if text and not text.endswith("\n"):
            problems.append(f"{name}: no newline at the end of the file")
        if any(line != line.rstrip() for line in text.splitlines()):
            problems.append(f"{name}: trailing whitespace")
        if name.endswith(".json") and text != json.dumps(json.loads(text), indent=4) + "\n":
            problems.append(f"{name}: not pretty-printed JSON (indent 4, keys in their order)")
        if name.endswith((".yaml", ".yml")):
            try:
                yaml.safe_load(text)
            except yaml.YAMLError as error:
                problems.append(f"{name}: invalid YAML ({error})")
        if name.endswith(".py"):
            body = ast.parse(text).body
            if body and ast.get_docstring(ast.Module(body=body, type_ignores=[])) is None and text.strip():
                problems.append(f"{name}: no module docstring first")
            if os.access(path, os.X_OK) and not text.startswith("#!"):
                problems.append(f"{name}: executable without a shebang")
    return problems


def rule_code_checks() -> list[str]:
    ruff = shutil.which("ruff") or os.path.join(os.path.dirname(sys.executable), "ruff")
    if not os.path.isfile(ruff):
        return ["ruff (requirements.txt) is not installed"]
    problems = []
    checked = ["bundle", "tests", "benchmarks", "monailabel_app"]
    for command in ([ruff, "check", *checked], [ruff, "format", "--check", *checked]):
        process = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if process.returncode != 0:
            problems.append(f"{' '.join(command[1:])}: {(process.stdout + process.stderr).strip()[-1500:]}")
    return problems


RULES = {
    "necessary-files": rule_necessary_files,
    "preferred-files": rule_preferred_files,
    "version-in-changelog": rule_version_in_changelog,
    "metadata-schema": rule_metadata_schema,
    "file-sizes": rule_file_sizes,
    "large-files-listed": rule_large_files_listed,
    "readme-sections": rule_readme_sections,
    "data-license": rule_data_license,
    "file-format": rule_file_format,
    "code-checks": rule_code_checks,
}


@pytest.mark.parametrize("rule", list(RULES))
def test_model_zoo_rule(rule):
    problems = RULES[rule]()
    assert not problems, f"Model Zoo rule '{rule}' is broken: " + "; ".join(problems)


def test_rules_can_fail(tmp_path, monkeypatch):
    """Each file rule notices a broken bundle (a copy with the problem planted)."""
    import test_model_zoo_conformance as rules

    broken = tmp_path / "bundle"
    shutil.copytree(BUNDLE / "configs", broken / "configs")
    shutil.copytree(BUNDLE / "docs", broken / "docs", ignore=shutil.ignore_patterns("*.png"))
    metadata = json.loads((broken / "configs" / "metadata.json").read_text())
    metadata["version"] = "0.0.1"
    (broken / "configs" / "metadata.json").write_text(json.dumps(metadata) + "  \n")
    (broken / "docs" / "README.md").write_text("# Title\n## Data\n")
    monkeypatch.setattr(rules, "BUNDLE", broken)
    monkeypatch.setattr(rules, "_bundle_files", lambda: ["configs/metadata.json", "docs/README.md"])
    assert rules.rule_necessary_files() == ["LICENSE is missing"]
    assert rules.rule_preferred_files() == ["models/model.pt is missing"]
    assert rules.rule_version_in_changelog() == ["version 0.0.1 has no changelog entry"]
    assert len(rules.rule_readme_sections()) == len(README_SECTIONS) - 1
    assert any("trailing whitespace" in p for p in rules.rule_file_format())
    assert any("not pretty-printed JSON" in p for p in rules.rule_file_format())
