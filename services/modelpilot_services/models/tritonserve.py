"""The Triton container's entrypoint, and the one way this project starts Triton.

Writes the on-disk model repository (every ModelPilot model, the Python backend, the layout
Triton's official image reads) and a backends dir whose Python-backend stub matches this
interpreter, then runs the ``tritonserver`` from the nvidia-pytriton wheel with the given
arguments. ``make services-up`` runs it as a local process; in clusters it is the Triton
sidecar's entrypoint (``images/services.Dockerfile``, target ``triton``):

    python -m modelpilot_services.models.tritonserve --model-repository=/models \\
        --model-control-mode=explicit --load-model=minilm_int8 --allow-metrics=true

The batching of the models the stage serves comes from the operator's service.json (mounted
from the stage's ConfigMap), so a new or restarted pod starts with the planned settings.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from collections.abc import Mapping, Sequence
from pathlib import Path

from modelpilot import contract
from modelpilot_services.models import minilm
from modelpilot_services.toolkit.service import service_config

# (max_batch_size, max_queue_delay_microseconds, instances) each model starts with, unless
# planned.
Batching = tuple[int, int, int]
BATCHING: dict[str, Batching] = {name: (64, 2000, 1) for name in minilm.VARIANTS} | {
    name: (64, 1000, 1) for name in minilm.RERANKERS
}


def model_config(name: str, max_batch_size: int, max_queue_delay_us: int, instances: int) -> str:
    """config.pbtxt; inputs and outputs come from the model's ``auto_complete_config``."""
    return (
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch_size}\n'
        f"dynamic_batching {{ max_queue_delay_microseconds: {max_queue_delay_us} }}\n"
        f"instance_group [ {{ kind: KIND_CPU, count: {instances} }} ]\n"
    )


def planned_batching(config: contract.ServiceConfig) -> dict[str, Batching]:
    """Each model's (max_batch_size, max_queue_delay_us, instances): the image's defaults,
    with the operator's plan (service.json) for the models the stage serves and its shadow
    candidate. A pod that starts or restarts so runs the plan without waiting for a live
    update."""
    batching = dict(BATCHING)
    if config.maxBatchSize is not None and config.maxQueueDelayMicroseconds is not None:
        models = config.models or ([config.model] if config.model else [])
        if config.shadow is not None:
            models = [*models, config.shadow.model]  # measured under the same batching
        planned = (config.maxBatchSize, config.maxQueueDelayMicroseconds, config.instances or 1)
        for model in models:
            if model in batching:
                batching[model] = planned
    return batching


def write_repository(root: Path, batching: Mapping[str, Batching] = BATCHING) -> Path:
    """The Triton model repository for every ModelPilot model (idempotent)."""
    source = Path(__file__).with_name("triton_model.py")
    for name, setting in batching.items():
        version = root / name / "1"
        version.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, version / "model.py")
        (root / name / "config.pbtxt").write_text(model_config(name, *setting))
    return root


def tritonserver() -> tuple[Path, Path, Path]:
    """(binary, shared-library dir, backends dir) of the wheel's Triton for this Python."""
    try:
        import pytriton
    except ImportError as e:
        raise SystemExit("nvidia-pytriton is not installed: run `make venv`") from e
    base = Path(pytriton.__file__).parent / "tritonserver"
    libs = base.parent.parent / "nvidia_pytriton.libs"
    return base / "bin" / "tritonserver", libs, base


def prepare_backends(target: Path) -> Path:
    """A backends dir whose python backend carries the stub built for this interpreter."""
    _, _, base = tritonserver()
    python = target / "python"
    python.mkdir(parents=True, exist_ok=True)
    for f in (base / "backends" / "python").iterdir():
        if f.is_file():
            shutil.copy2(f, python / f.name)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = base / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise SystemExit(f"the wheel has no Python-backend stub for Python {version}")
    shutil.copy2(stub, python / "triton_python_backend_stub")
    return target


def command(args: Sequence[str], workdir: Path) -> tuple[list[str], dict[str, str]]:
    """Prepare the repository named by ``--model-repository`` and the backends under
    ``workdir``; return tritonserver's argv and environment."""
    repo = next((a.split("=", 1)[1] for a in args if a.startswith("--model-repository=")), None)
    if repo is None:
        raise SystemExit("--model-repository=DIR is required")
    write_repository(Path(repo), planned_batching(service_config("triton")))
    backends = prepare_backends(workdir / "backends")
    binary, libs, _ = tritonserver()
    paths = sysconfig.get_paths()
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": f"{libs}:{os.environ.get('LD_LIBRARY_PATH', '')}",
        # The python-backend stub runs the models with these packages (site.addsitedir).
        "MODELPILOT_SITE_PACKAGES": os.pathsep.join(
            dict.fromkeys([paths["purelib"], paths["platlib"]])
        ),
        "MODELPILOT_MODEL_THREADS": os.environ.get("MODELPILOT_MODEL_THREADS", "1"),
    }
    return [str(binary), f"--backend-directory={backends}", *args], env


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    minilm.build()  # a no-op where the image built them already
    workdir = Path(os.environ.get("MODELPILOT_TRITON_WORKDIR", "/tmp/modelpilot-triton"))
    binary_argv, env = command(args, workdir)
    sys.stdout.flush()
    os.execve(binary_argv[0], binary_argv, env)  # Triton becomes the container's process


if __name__ == "__main__":
    main()
