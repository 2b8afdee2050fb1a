#!/usr/bin/env python3
"""Build the single-file binary dist/barosync (what `make binary` runs).

    python3 packaging/build.py [--venv DIR] [--python PYTHON]

1. Makes (or refreshes) a build-only virtualenv, by default build/venv: barosync's
   runtime dependencies and PyInstaller (the `build` extra), nothing from the `test`
   extra, and not barosync itself (it is bundled from this source tree, so the binary
   always matches the checkout). The venv is reinstalled when pyproject.toml changes.
2. Runs PyInstaller on packaging/barosync.spec (onefile), work files in
   build/pyinstaller.
3. Runs `dist/barosync --version` as a smoke test and prints the size and build time.

The Python that makes the venv is the Python inside the binary: it must be a CPython
3.11+ built with a shared libpython (Debian's python3 and pyenv's are).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "packaging" / "barosync.spec"
DIST = ROOT / "dist"
WORK = ROOT / "build" / "pyinstaller"
STAMP = ".barosync-build-deps"
# Must never end up in the binary (and so must not be in the build venv).
TEST_TOOLS = ("pytest", "pytest_trio", "hypothesis")


def run(*cmd: str | Path, **kw) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv(venv: Path, python: str) -> Path:
    py = venv_python(venv)
    # Rebuilt when the dependencies or the Python change.
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + python.encode()).hexdigest()
    stamp = venv / STAMP
    if py.exists() and stamp.exists() and stamp.read_text().strip() == wanted:
        return py
    if venv.exists():
        shutil.rmtree(venv)
    run(python, "-m", "venv", venv)
    run(py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--upgrade", "pip")
    # Installing the project with its build extra pulls exactly the runtime
    # dependencies and PyInstaller; barosync itself is then removed again so that
    # PyInstaller takes it from the source tree.
    run(py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", f"{ROOT}[build]", cwd=venv)
    run(py, "-m", "pip", "uninstall", "--quiet", "--yes", "barosync")
    stamp.write_text(wanted + "\n")
    return py


def check_clean(py: Path) -> None:
    probe = "import importlib.util, sys; sys.stdout.write(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m)))"
    found = subprocess.run([str(py), "-c", probe, *TEST_TOOLS], check=True, capture_output=True, text=True).stdout.split()
    if found:
        sys.exit(f"build: the build venv {py.parent.parent} has test tools installed ({', '.join(found)}); "
                 "delete it and build again")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=ROOT / "build" / "venv", help="build-only virtualenv (default build/venv)")
    parser.add_argument("--python", default=sys.executable, help="Python that creates the venv (default: the one running this script)")
    args = parser.parse_args()

    started = time.monotonic()
    py = ensure_venv(args.venv.resolve(), args.python)
    check_clean(py)
    deps_done = time.monotonic()
    # PYTHONNOUSERSITE / a clean PYTHONPATH: only the build venv's packages are seen.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    run(py, "-m", "PyInstaller", "--noconfirm", "--clean", "--log-level", "WARN",
        "--distpath", DIST, "--workpath", WORK, SPEC, cwd=ROOT, env=env)
    built = time.monotonic()
    binary = DIST / "barosync"
    smoke = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=120)
    if smoke.returncode != 0:
        sys.stderr.write(smoke.stderr)
        sys.exit(f"build: {binary.relative_to(ROOT)} --version failed (exit {smoke.returncode}); see above")
    version = smoke.stdout.strip()
    size = binary.stat().st_size
    print(f"built {binary.relative_to(ROOT)}: {version}, {size / 2**20:.1f} MiB ({size} bytes); "
          f"PyInstaller {built - deps_done:.0f} s, total {built - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
