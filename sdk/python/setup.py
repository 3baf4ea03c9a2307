"""Builds the package with its gRPC stubs generated from the repository's
proto/ directory (never checked in, so they cannot drift from the protos).

The stubs land where the proto packages say: `statefabric/state/v1/*_pb2.py`
inside this package. STATEFABRIC_PROTO_DIR overrides where proto/ is."""

import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
PROTO_PACKAGE = Path("statefabric/state/v1")


def proto_root() -> Path:
    root = Path(os.environ.get("STATEFABRIC_PROTO_DIR", HERE.parent.parent / "proto"))
    if not (root / PROTO_PACKAGE).is_dir():
        raise SystemExit(
            f"cannot find {PROTO_PACKAGE} under {root}: build from the Statefabric "
            "repository, or set STATEFABRIC_PROTO_DIR to its proto/ directory"
        )
    return root


def generate(out: Path) -> None:
    from grpc_tools import protoc  # a build requirement (pyproject.toml)

    root = proto_root()
    sources = sorted(str(p.relative_to(root)) for p in (root / PROTO_PACKAGE).glob("*.proto"))
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {sources}")
    for package in (out / "statefabric/state", out / PROTO_PACKAGE):
        (package / "__init__.py").touch()


class BuildWithStubs(build_py):
    def run(self) -> None:
        super().run()
        generate(Path(self.build_lib))


setup(cmdclass={"build_py": BuildWithStubs})
