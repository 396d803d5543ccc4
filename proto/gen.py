"""Regenerate the Python modules of raylm's .proto files.

    python -m raylm.proto.gen            # rewrite proto/generation_pb2*.py
    python -m raylm.proto.gen --check    # exit 1 if the checked-in modules are stale

protoc writes `raylm/v1/generation_pb2*.py`; we flatten them into proto/ (import path
`raylm.proto.generation_pb2`) and point the gRPC module's import and the message classes'
`__module__` at that package. The
descriptor keeps the file name `raylm/v1/generation.proto`, which reflection reports.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILES = ("raylm/v1/generation.proto",)
# protoc output name (relative to its out dir) -> name in proto/
_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def _module_stem(proto_file: str) -> str:
    return Path(proto_file).stem


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on PROTO_FILES and write the flattened modules into out_dir."""
    from grpc_tools import protoc  # dev dependency: grpcio-tools

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as raw:
        include = Path(protoc.__file__).parent / "_proto"
        for proto_file in PROTO_FILES:
            rc = protoc.main([
                "grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{include}",
                f"--python_out={raw}", f"--pyi_out={raw}", f"--grpc_python_out={raw}",
                str(PROTO_DIR / proto_file),
            ])
            if rc != 0:
                raise RuntimeError(f"protoc failed on {proto_file} (exit {rc})")
            stem = _module_stem(proto_file)
            package = str(Path(proto_file).parent).replace("/", ".")  # raylm.v1
            for suffix in _SUFFIXES:
                src = Path(raw) / Path(proto_file).parent / f"{stem}{suffix}"
                text = src.read_text()
                # the generated gRPC module imports `from raylm.v1 import generation_pb2`
                text = text.replace(f"from {package} import {stem}_pb2",
                                    f"from raylm.proto import {stem}_pb2")
                # message classes record their module (pickling, e.g. through Ray, imports it)
                text = text.replace(f"'{package}.{stem}_pb2'", f"'raylm.proto.{stem}_pb2'")
                dst = out_dir / f"{stem}{suffix}"
                dst.write_text(text)
                written.append(dst)
    return written


def _normalize(text: str) -> str:
    """Drop the lines that only record the generator's version, so a checkout generated with a
    newer grpcio-tools is not reported stale when the schema is unchanged."""
    text = re.sub(r"# Protobuf Python Version: .*\n", "", text)
    text = re.sub(r"ValidateProtobufRuntimeVersion\([^)]*\)", "ValidateProtobufRuntimeVersion()", text)
    return re.sub(r"GRPC_GENERATED_VERSION = '[^']*'", "GRPC_GENERATED_VERSION = ''", text)


def stale_files(target_dir: Path = PROTO_DIR) -> list[str]:
    """Names of generated modules in target_dir that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = []
        for path in fresh:
            current = Path(target_dir) / path.name
            if not current.exists() or _normalize(current.read_text()) != _normalize(path.read_text()):
                stale.append(path.name)
        return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="only check that the checked-in modules are up to date")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(f"stale generated modules: {', '.join(stale)}; run python -m raylm.proto.gen")
            return 1
        print("generated modules are up to date")
        return 0
    for path in generate(PROTO_DIR):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
