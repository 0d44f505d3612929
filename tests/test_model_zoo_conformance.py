"""The MONAI Model Zoo's bundle checks, replayed offline against ``bundle/``.

The Zoo's CI (``ci/verify_bundle.py``, ``ci/run_premerge_cpu.sh`` and its pre-commit hooks) requires: a ``LICENSE``
and ``configs/metadata.json``; ``models/model.pt`` and ``configs/inference.{json,yaml}``; a ``version`` present in
``changelog``; metadata valid against the schema; weights in the bundle under 25 MB or listed in ``large_files.yml``;
files added to the repository under 1 MB otherwise; pretty-printed JSON, parseable YAML, a newline at the end of
files and no trailing whitespace; module docstrings first; flake8-style code checks. Its README template has the
sections Authors, Tags, Model Description, Data, Preprocessing, Performance, System Configuration, Limitations,
Citation, References; data with terms of use needs ``docs/data_license.txt``. ``verify_net_in_out`` on
``network_def`` and the TorchScript export are in ``test_bundle_config.py``. Each rule fails with its name.

Beyond the Zoo: every ``monai.bundle run`` command of the README and the bundle's docs is a valid invocation of these
configs (files, run id, override ids), so the docs cannot drift from the configs.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import BUNDLE, REPO
from monai.bundle import ConfigParser, verify_metadata

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
FILE_ARGUMENTS = ("meta_file", "logging_file", "args_file")  # monai.bundle run reads these files, not config ids


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


def _strip_comment(line: str) -> str:
    """``line`` without its shell comment: a ``#`` outside quotes that starts a word (``train#dataset`` is an id)."""
    quote = None
    for index, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index]
    return line


def shell_commands(block: str) -> list[str]:
    """The logical command lines of a shell block: comments dropped, a line ending in ``\\`` joined to the next."""
    commands, pending = [], ""
    for line in block.splitlines():
        code = _strip_comment(line).rstrip()
        if code.endswith("\\"):
            pending += code[:-1] + " "
            continue
        if (pending + code).strip():
            commands.append((pending + code).strip())
        pending = ""
    if pending.strip():
        commands.append(pending.strip())
    return commands


def doc_bundle_commands(text: str) -> list[str]:
    """The ``monai.bundle run`` commands of a markdown page: its fenced code blocks and its inline code spans."""
    fenced = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
    commands = [command for block in fenced.findall(text) for command in shell_commands(block)]
    prose = fenced.sub("", text).replace("\n", " ")
    commands += [span.strip() for span in re.findall(r"`([^`]+)`", prose)]
    return [command for command in commands if re.search(r"-m monai\.bundle run\b", command)]


def bundle_invocation_problems(command: str, cwd=REPO) -> list[str]:
    """What keeps ``command`` (a shell line with ``[python|torchrun ...] -m monai.bundle run``) from running here.

    Config files (one path, a comma-separated string or a ``"['a.yaml','b.yaml']"`` list, relative to ``cwd`` or to a
    ``cd DIR &&`` before it) must exist, the run id and every ``--key`` override must be ids of the merged config,
    and ``--meta_file`` / ``--logging_file`` must exist. ``[--key value]`` marks an optional flag, ``...`` elision.
    """
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, ""
    try:
        tokens = list(lexer)
    except ValueError as error:
        return [f"does not parse as a shell line ({error})"]
    segments, segment = [], []
    for token in tokens:
        if token in ("&&", "||", ";", "|", "&"):
            segments.append(segment)
            segment = []
        else:
            segment.append(token)
    segments.append(segment)
    problems, found = [], False
    for segment in segments:
        if segment[:1] == ["cd"] and len(segment) == 2:
            cwd = cwd / segment[1]
            continue
        starts = [i for i in range(1, len(segment) - 1) if segment[i - 1 : i + 2] == ["-m", "monai.bundle", "run"]]
        if not starts:
            continue
        found = True
        arguments = segment[starts[0] + 2 :]
        run_id = arguments.pop(0) if arguments and not arguments[0].startswith(("-", "[")) else "run"
        options = {}
        for index, token in enumerate(arguments):
            if token.startswith(("--", "[--")):
                key, _, value = token.lstrip("[").rstrip("]").removeprefix("--").partition("=")
                following = arguments[index + 1] if index + 1 < len(arguments) else ""
                value = value or ("" if following.startswith(("--", "[--")) else following)
                options[key] = value.rstrip("]") if token.startswith("[") else value
        run_id = options.pop("run_id", run_id)
        config = options.pop("config_file", "")
        if not config:
            problems.append("has no --config_file")
            continue
        try:
            names = ast.literal_eval(config) if config.startswith("[") else config.split(",")
        except (ValueError, SyntaxError):
            problems.append(f"--config_file {config!r} is neither a path nor a list of paths")
            continue
        paths = [cwd / str(name).strip() for name in names]
        missing = [str(path.relative_to(cwd)) for path in paths if not path.is_file()]
        problems += [f"config file {name} does not exist" for name in missing]
        for key in FILE_ARGUMENTS:
            if key in options and not (cwd / options.pop(key)).is_file():
                problems.append(f"--{key} names a file that does not exist")
        if missing:
            continue
        parser = ConfigParser(ConfigParser.load_config_files([str(path) for path in paths]))
        config_names = ", ".join(str(path.relative_to(cwd)) for path in paths)
        if run_id not in parser:
            problems.append(f"run id '{run_id}' is not in {config_names}")
        problems += [f"--{key} is not an id of {config_names}" for key in options if key not in parser]
    return problems if found else ["is not a monai.bundle run command"]


def rule_doc_commands() -> list[str]:
    problems = []
    for page in [REPO / "README.md", *sorted((BUNDLE / "docs").glob("*.md"))]:
        for command in doc_bundle_commands(page.read_text()):
            shown = command if len(command) <= 160 else command[:157] + "..."
            problems += [f"{page.relative_to(REPO)}: `{shown}` {p}" for p in bundle_invocation_problems(command)]
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
    "doc-commands": rule_doc_commands,
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


def test_doc_commands_are_read_as_a_shell_reads_them():
    """Continuations join, comments drop (an id's ``#`` stays), inline spans count, other commands do not."""
    block = (
        "# register\n"
        "python -m monai.bundle run inference --config_file bundle/configs/inference.yaml \\\n"
        "    --refine_iterations 0   # the network alone\n"
        "python bundle/scripts/apply_ddf.py O/ddf.nii.gz M.nii.gz O/w.nii.gz\n"
    )
    assert shell_commands(block) == [
        "python -m monai.bundle run inference --config_file bundle/configs/inference.yaml      --refine_iterations 0",
        "python bundle/scripts/apply_ddf.py O/ddf.nii.gz M.nii.gz O/w.nii.gz",
    ]
    assert shell_commands("x --train#dataset#cache_rate 0.5 # comment") == ["x --train#dataset#cache_rate 0.5"]
    inline = "`python -m monai.bundle run training\n--config_file bundle/configs/train.yaml`"
    assert len(doc_bundle_commands(f"text {inline} text\n```bash\n{block}```\n")) == 2


TRAIN, MNIST = "bundle/configs/train.yaml", "bundle/configs/mnist.yaml"


@pytest.mark.parametrize(
    "command, problem",
    [
        ("python -m monai.bundle run training --config_file bundle/configs/none.yaml", "none.yaml does not exist"),
        (
            f"python -m monai.bundle run trainig --config_file \"['{TRAIN}','{MNIST}']\"",
            f"run id 'trainig' is not in {TRAIN}, {MNIST}",
        ),
        (f"python -m monai.bundle run inference --config_file {TRAIN}", "run id 'inference' is not"),
        (
            "python -m monai.bundle run inference --config_file bundle/configs/inference.yaml --refine_iteration 0",
            "--refine_iteration is not an id",
        ),
        (
            f"python -m monai.bundle run training --config_file {TRAIN} --meta_file configs/meta.json",
            "--meta_file names a file that does not exist",
        ),
        (f"cd bundle && python -m monai.bundle run training --config_file {TRAIN}", "does not exist"),
        ("torchrun --nproc_per_node=2 -m monai.bundle run training", "has no --config_file"),
        (
            "python -m monai.bundle ckpt_export network_def --config_file configs/inference.yaml",
            "not a monai.bundle run",
        ),
    ],
)
def test_doc_commands_can_fail(command, problem):
    """A fabricated bad command is reported with what is wrong with it."""
    problems = bundle_invocation_problems(command)
    assert any(problem in p for p in problems), problems


def test_doc_commands_good_forms_pass():
    """Other spellings a page may use: ``cd bundle &&``, file arguments, ``--key=value``, ``--run_id``, ``#`` ids."""
    assert (
        bundle_invocation_problems(
            "cd bundle && python -m monai.bundle run training --config_file configs/train.yaml "
            "--meta_file configs/metadata.json --logging_file configs/logging.conf [--resume true] ..."
        )
        == []
    )
    assert (
        bundle_invocation_problems(
            "torchrun --standalone --nproc_per_node=2 -m monai.bundle run --run_id training "
            f"--config_file={TRAIN},bundle/configs/multi_gpu_train.yaml --train#subject_dataset#cache_rate 0.5"
        )
        == []
    )
