"""The examples run as a user would run them, against `fabric dev`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .conftest import Sidecar
from .model_upstream import ModelUpstream, dev_with_egress

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(example: str, env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / example), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{example} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_the_quickstart_runs(dev: Sidecar) -> None:
    out = run("quickstart.py", {"STATEFABRIC_ADDRESS": f"http://{dev.address}"})
    assert "a second creation is refused" in out
    assert "replayed=True" in out
    assert "tokens used: 50" in out


def test_the_trio_runs_a_saga_to_approval(dev: Sidecar) -> None:
    out = run("trio.py", {}, dev.address)
    assert "the critic approved" in out
    assert out.count("coder    code") == 2, out


def test_the_openai_agent_asks_the_model_through_the_egress() -> None:
    model = ModelUpstream()
    sidecar = dev_with_egress(model).start()
    try:
        out = run(
            "openai_agent.py",
            {"STATEFABRIC_ADDRESS": sidecar.address, "STATEFABRIC_EGRESS_ADDRESS": sidecar.egress},
            "m",
        )
        assert "answer #1 to Plan, in three short steps: add a health check" in out
        assert model.calls[0]["authorization"] == "Bearer sk-held-by-the-sidecar"
    finally:
        sidecar.stop()
        model.close()
