"""Generate the `ramp` package from proto/ (or, with --check, fail if it is stale).

Runs grpcio-tools' protoc with the connectrpc plugin (protobuf=google) and the
grpcio plugin, so nothing outside the package registries is needed.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto"
OUT = ROOT / "ramp"


def generate(dest: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO)) for p in PROTO.rglob("*.proto"))
    plugin = Path(sysconfig.get_path("scripts")) / "protoc-gen-connectrpc"
    cmd = [
        sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO}",
        f"--python_out={dest}", f"--pyi_out={dest}", f"--grpc_python_out={dest}",
        f"--plugin=protoc-gen-connectrpc={plugin}", f"--connectrpc_out={dest}",
        "--connectrpc_opt=protobuf=google", *protos,
    ]
    subprocess.run(cmd, check=True, cwd=PROTO)
    # protoc writes modules only; make every directory an importable package.
    for d in [dest / "ramp", *(p for p in (dest / "ramp").rglob("*") if p.is_dir())]:
        if d.name != "__pycache__":
            (d / "__init__.py").touch()


def tree(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if ramp/ differs from a fresh generation")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        fresh_root = fresh / "ramp"
        if args.check:
            have, want = tree(OUT) if OUT.exists() else set(), tree(fresh_root)
            stale = sorted(
                str(p) for p in have ^ want
                | {p for p in have & want if not filecmp.cmp(OUT / p, fresh_root / p, shallow=False)}
            )
            if stale:
                print("generated code is stale; run `make gen`:", *stale, sep="\n  ", file=sys.stderr)
                return 1
            print("generated code is up to date")
            return 0
        shutil.rmtree(OUT, ignore_errors=True)
        shutil.copytree(fresh_root, OUT)
        print(f"generated {len(tree(OUT))} files in {OUT.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
