"""Generate the `ramp` package from proto/ (or, with --check, fail if it is stale).

Runs grpcio-tools' protoc with the connectrpc plugin (protobuf=google) and the
grpcio plugin, so nothing outside the package registries is needed.

Besides the broker's own protos (proto/ramp/), the gRPC services the broker serves for
the ecosystem's tools get connectrpc stubs under ramp/grpc/:

- grpc.health.v1.Health and grpc.reflection.v1alpha.ServerReflection: stubs only, made from
  the descriptors of the installed grpcio-health-checking and grpcio-reflection packages, and
  importing their message classes (one copy of each message in the descriptor pool, shared
  with grpcio's own clients in the same process);
- grpc.reflection.v1.ServerReflection, which no Python package ships: messages and stubs from
  proto/vendor/grpc/reflection/v1/reflection.proto, a verbatim copy of grpc/grpc-proto's file
  (Apache 2.0).
"""

from __future__ import annotations

import argparse
import filecmp
import importlib
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto"
OUT = ROOT / "ramp"
VENDOR = PROTO / "vendor"
# Services whose messages a grpcio package owns: (module, the proto name the stub is generated
# under, so it lands in ramp/grpc/...).
PACKAGED = (
    ("grpc_health.v1.health_pb2", "grpc/health/v1/health.proto"),
    ("grpc_reflection.v1alpha.reflection_pb2", "grpc/reflection/v1alpha/reflection.proto"),
)


def generate(dest: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO)) for p in (PROTO / "ramp").rglob("*.proto"))
    plugin = Path(sysconfig.get_path("scripts")) / "protoc-gen-connectrpc"
    protoc = [sys.executable, "-m", "grpc_tools.protoc", f"--plugin=protoc-gen-connectrpc={plugin}",
              "--connectrpc_opt=protobuf=google"]
    cmd = [
        *protoc, f"-I{PROTO}", f"--python_out={dest}", f"--pyi_out={dest}", f"--grpc_python_out={dest}",
        f"--connectrpc_out={dest}", *protos,
    ]
    subprocess.run(cmd, check=True, cwd=PROTO)
    # Third-party services, into ramp/grpc/.
    vendored = sorted(str(p.relative_to(VENDOR)) for p in VENDOR.rglob("*.proto"))
    out = dest / "ramp"
    out.mkdir(exist_ok=True)
    subprocess.run([*protoc, f"-I{VENDOR}", f"--python_out={out}", f"--pyi_out={out}",
                    f"--connectrpc_out={out}", *vendored], check=True, cwd=VENDOR)
    for module, name in PACKAGED:
        _packaged_stub(protoc, out, module, name)
    # protoc writes modules only; make every directory an importable package.
    for d in [dest / "ramp", *(p for p in (dest / "ramp").rglob("*") if p.is_dir())]:
        if d.name != "__pycache__":
            (d / "__init__.py").touch()


def _packaged_stub(protoc: list[str], out: Path, module: str, name: str) -> None:
    """The connectrpc stub of an installed package's service, importing that package's messages."""
    descriptor: FileDescriptor = importlib.import_module(module).DESCRIPTOR
    proto = descriptor_pb2.FileDescriptorProto()
    descriptor.CopyToProto(proto)
    if list(proto.dependency):
        raise SystemExit(f"{module}: imports {list(proto.dependency)}; add them to the descriptor set")
    proto.name = name
    with tempfile.TemporaryDirectory() as tmp:
        descriptors = Path(tmp) / "set.pb"
        descriptors.write_bytes(descriptor_pb2.FileDescriptorSet(file=[proto]).SerializeToString())
        subprocess.run([*protoc, f"--descriptor_set_in={descriptors}", f"--connectrpc_out={out}", name],
                       check=True, cwd=tmp)
    stub = out / name.replace(".proto", "_connect.py")
    local = f"from .{Path(name).stem}_pb2 import "
    text = stub.read_text()
    if text.count(local) != 1:
        raise SystemExit(f"{stub}: expected one `{local}...` line to point at {module}")
    stub.write_text(text.replace(local, f"from {module} import "))


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
