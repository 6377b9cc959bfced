"""The images build from the clone and serve: ``hack/build-images.sh --smoke`` builds the
operator, service and triton images (Podman here, from a Debian base made by mmdebstrap, as
there is no Docker engine or image registry), then runs Triton from the triton image and the
embedding service from its image and embeds a text through both."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow


@pytest.mark.timeout(45 * 60)
def test_the_images_build_and_embed_a_text_through_triton() -> None:
    env = {
        **os.environ,
        "IMAGE_REPOSITORY": "localhost/modelpilot",
        "IMAGE_TAG": "test",
        "BASE_FROM_DEBIAN": "1",
    }
    # Cold, the first service image takes minutes (pip installs the serving stack); later
    # runs reuse Podman's layer cache.
    run = subprocess.run(
        ["hack/build-images.sh", "--smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=40 * 60,
    )
    tail = f"stdout:\n{run.stdout[-3000:]}\nstderr:\n{run.stderr[-5000:]}"
    assert run.returncode == 0, tail
    assert "built: operator ingestion embedding retrieval inference triton" in run.stdout, tail
    assert "smoke: Triton and the embedding service from the images embedded a text" in (
        run.stdout
    ), tail
