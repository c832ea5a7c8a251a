"""Regenerate the Python code for protos/stepstream/*/v1/*.proto.

Run `python scripts/gen_protos.py` after editing a .proto file and commit the
result; tests/test_contract.py fails while the committed code is out of date.

Besides the code it writes stepstream/descriptors.binpb: a FileDescriptorSet
of the same files with their comments (protoc --include_source_info), which
server reflection serves so that `grpcurl describe` shows the documentation;
generated code never carries comments (see stepstream_common.rpc.enable_reflection).

Each proto package gets its own folder of generated code (stepstream/common/v1,
stepstream/orchestrator/v1, stepstream/status/v1); the hand-written contract
helpers beside them (stepstream/states.py, ...) are never touched. Modules
protoc would write for files without services (empty *_pb2_grpc.py) are removed.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent.parent / "protos"
PACKAGE_DIRS = tuple(Path("stepstream") / name / "v1" for name in ("common", "orchestrator", "status"))
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
DESCRIPTOR_SET = "descriptors.binpb"


def tool(name: str) -> str:
    """A binary from the dev extras: beside this interpreter, else on PATH."""
    found = Path(sys.executable).parent / name
    if found.exists():
        return str(found)
    on_path = shutil.which(name)
    if on_path is None:
        raise SystemExit(f"{name} not found: install the dev extra (pip install -e '.[dev]')")
    return on_path


def generate(out_root: Path) -> list[Path]:
    """Generate into out_root/stepstream/*/v1 and return the generated code files
    (the descriptor set, also written, is descriptor_set(out_root))."""
    protos = sorted(
        str(p.relative_to(PROTO_ROOT)) for package in PACKAGE_DIRS for p in (PROTO_ROOT / package).glob("*.proto")
    )
    for package in PACKAGE_DIRS:
        (out_root / package).mkdir(parents=True, exist_ok=True)
        for stale in (out_root / package).iterdir():
            if stale.name.endswith(GENERATED_SUFFIXES):
                stale.unlink()
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={out_root}",
            f"--grpc_python_out={out_root}",
            f"--mypy_out={out_root}",
            f"--mypy_grpc_out={out_root}",
            f"--plugin=protoc-gen-mypy={tool('protoc-gen-mypy')}",
            f"--plugin=protoc-gen-mypy_grpc={tool('protoc-gen-mypy_grpc')}",
            f"--descriptor_set_out={descriptor_set(out_root)}",
            "--include_source_info",
            *protos,
        ],
        check=True,
    )
    generated: list[Path] = []
    for package in PACKAGE_DIRS:
        for folder in (out_root / package.parent, out_root / package):
            (folder / "__init__.py").touch()
            (folder / "py.typed").touch()
        for path in sorted((out_root / package).iterdir()):
            if path.name.endswith(("_pb2_grpc.py", "_pb2_grpc.pyi")) and not _has_service(package, path):
                path.unlink()
            elif path.name.endswith(GENERATED_SUFFIXES):
                generated.append(path)
    return generated


def _has_service(package: Path, grpc_module: Path) -> bool:
    proto = PROTO_ROOT / package / (grpc_module.name.split("_pb2_grpc")[0] + ".proto")
    return any(line.startswith("service ") for line in proto.read_text().splitlines())


def descriptor_set(out_root: Path) -> Path:
    return out_root / "stepstream" / DESCRIPTOR_SET


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="output root (default: protos/)")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path)
    print(descriptor_set(args.out))


if __name__ == "__main__":
    main()
