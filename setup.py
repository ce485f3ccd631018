"""Build hook: compile protos/ with grpcio-tools at build time (``pip install .`` / ``-e .``).

Generated code is never committed. The proto files live under ``protos/authz_server/_proto/``
so the generated modules land in the package ``authz_server._proto`` and import each other as
``authz_server._proto.*`` without sys.path tricks.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def compile_protos() -> None:
    import grpc_tools
    from grpc_tools import protoc

    proto_root = ROOT / "protos"
    include = Path(grpc_tools.__file__).parent / "_proto"
    files = sorted(str(p.relative_to(proto_root)) for p in proto_root.rglob("*.proto"))
    args = ["protoc", f"-I{proto_root}", f"-I{include}", f"--python_out={ROOT}",
            f"--grpc_python_out={ROOT}", f"--pyi_out={ROOT}", *files]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {files}")


class BuildWithProtos(build_py):
    def run(self) -> None:
        compile_protos()
        super().run()


setup(cmdclass={"build_py": BuildWithProtos})
