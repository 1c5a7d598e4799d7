"""Regenerate ``converters/caffe_pb2.py`` from ``converters/caffe.proto``.

Run ``python converters/generate_proto.py`` (or ``python -m converters.generate_proto``) after
editing the schema. It calls grpc_tools' bundled ``protoc`` (no system protoc needed) and writes
the module next to the schema; the generated file is committed so users need no protoc at all.
It also rewrites ``converters/PROTOBUF_MIN`` with the protobuf runtime version the generated
code requires.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO = os.path.join(HERE, "caffe.proto")
OUTPUT = os.path.join(HERE, "caffe_pb2.py")
MIN_FILE = os.path.join(HERE, "PROTOBUF_MIN")


def generate(out_dir):
    """Run protoc on caffe.proto, writing caffe_pb2.py into ``out_dir``; return its path."""
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I" + HERE, "--python_out=" + out_dir,
           PROTO]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError("protoc failed (%d): %s" % (result.returncode, result.stderr.strip()))
    return os.path.join(out_dir, "caffe_pb2.py")


def required_runtime(generated_text):
    """The protobuf runtime version the generated code validates against, e.g. '6.31.1'."""
    m = re.search(r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*"
                  r"(\d+),\s*(\d+),\s*(\d+)", generated_text)
    if m:
        return "%s.%s.%s" % m.groups()
    m = re.search(r"# Protobuf Python Version: (\d+\.\d+\.\d+)", generated_text)
    return m.group(1) if m else None


def main():
    tmp = tempfile.mkdtemp(prefix="caffe_proto_")
    try:
        path = generate(tmp)
        with open(path) as f:
            text = f.read()
        shutil.copyfile(path, OUTPUT)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    version = required_runtime(text)
    if version:
        with open(MIN_FILE, "w") as f:
            f.write("protobuf>=%s\n" % version)
    print("wrote %s (protobuf runtime >= %s)" % (OUTPUT, version))


if __name__ == "__main__":
    main()
