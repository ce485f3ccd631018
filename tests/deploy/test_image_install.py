"""The container image, without a Docker engine: the Dockerfile's shape is checked statically, and
its install step (deploy/docker/install.sh) is run for real into a fresh venv from a copy of exactly
the files the Dockerfile COPYs, filtered by .dockerignore as the build context would be."""
from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def stages() -> list[list[tuple[str, str]]]:
    """Dockerfile -> stages, each a list of (INSTRUCTION, arguments); continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, args = line.partition(" ")
        if instr.upper() == "FROM":
            out.append([])
        if out:
            out[-1].append((instr.upper(), args.strip()))
    return out


def dockerignored(rel: str) -> bool:
    """.dockerignore semantics for the simple patterns used there: a pattern excludes a path or
    any of its parent directories; "**/" matches at any depth."""
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    parts = rel.split("/")
    for pattern in patterns:
        starts = range(len(parts)) if pattern.startswith("**/") else [0]
        pattern = pattern.removeprefix("**/")
        if any(fnmatch.fnmatchcase("/".join(parts[i:j]), pattern)
               for i in starts for j in range(i + 1, len(parts) + 1)):
            return True
    return False


def builder_copies() -> list[tuple[list[str], str]]:
    builder = stages()[0]
    return [(args.split()[:-1], args.split()[-1]) for instr, args in builder
            if instr == "COPY" and not args.startswith("--from")]


def test_dockerfile_final_stage():
    builder, final = stages()
    assert builder[0][1].endswith("AS builder")
    instrs = {}
    for instr, args in final:
        instrs.setdefault(instr, []).append(args)
    # only the venv comes from the builder: no sources, caches or build tools
    assert instrs["COPY"] == ["--from=builder /opt/venv /opt/venv"]
    assert "RUN" not in instrs
    user = instrs["USER"][-1]
    assert re.fullmatch(r"[1-9]\d*:\d+", user), "numeric non-root UID:GID, so runAsNonRoot can verify it"
    env = " ".join(instrs["ENV"])
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert sorted(" ".join(instrs["EXPOSE"]).split()) == ["9000", "9090"]
    # the health check follows the server's own settings (AUTHZ_METRICS_LISTEN), no fixed port
    assert instrs["HEALTHCHECK"][-1].endswith('CMD ["authz-server", "health"]')
    # exec form: authz-server is PID 1 and gets SIGTERM itself (shell form would wrap it in sh -c)
    assert json.loads(instrs["ENTRYPOINT"][-1]) == ["authz-server"]


def test_build_context_holds_what_the_dockerfile_copies():
    for sources, _ in builder_copies():
        for src in sources:
            assert (ROOT / src).exists(), src
            files = [src] if (ROOT / src).is_file() else \
                [str(p.relative_to(ROOT)) for p in (ROOT / src).rglob("*") if p.is_file()]
            kept = [f for f in files if not dockerignored(f)]
            assert kept, f"{src} is entirely excluded by .dockerignore"
    for needed in ("deploy/docker/install.sh", "deploy/docker/requirements.lock", "deploy/docker/build.lock",
                   "setup.py", "pyproject.toml"):
        assert not dockerignored(needed), needed
    assert dockerignored(".git/config") and dockerignored("authz_server/__pycache__/x.pyc")


@pytest.mark.packaging
def test_image_install_steps_produce_a_working_server(tmp_path):
    # The build context as Docker would see it, laid out as the builder stage's COPYs do.
    src = tmp_path / "src"
    for sources, dest in builder_copies():
        for s in sources:
            target = src / dest / Path(s).name if dest.endswith("/") else src / dest
            if (ROOT / s).is_dir():
                shutil.copytree(ROOT / s, target, ignore=lambda d, names: [
                    n for n in names if dockerignored(str((Path(d) / n).relative_to(ROOT)))])
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / s, target)
    [run] = [args for instr, args in stages()[0] if instr == "RUN"]
    m = re.fullmatch(r"sh (deploy/docker/install\.sh) (\S+) (\S+)", run)
    assert m, f"the builder's RUN must be the install script: {run}"
    venv = tmp_path / "venv"
    env = {**os.environ, "PYTHON": sys.executable, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run(["sh", m.group(1), str(venv), str(src)], cwd=src, env=env, check=True, timeout=600)

    result = subprocess.run([str(venv / "bin" / "authz-server"), "--help"], capture_output=True, text=True,
                            env={"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"},
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "serve" in result.stdout
    # the image runs the fast path (uvloop) and can export traces (--otel-endpoint): the exporter is
    # built as the server builds it, which imports the OTLP protos xds-protos can shadow
    for code in ("import uvloop",
                 "from authz_server.observability.tracing import build_tracer; "
                 "build_tracer('http://127.0.0.1:4317').shutdown()"):
        probe = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, timeout=60)
        assert probe.returncode == 0, f"{code!r} fails in the image venv: " + probe.stderr.decode()
    # build-only tools must not end up in the runtime venv
    probe = subprocess.run([str(venv / "bin" / "python"), "-c", "import grpc_tools"], capture_output=True)
    assert probe.returncode != 0, "grpcio-tools leaked into the runtime venv"
