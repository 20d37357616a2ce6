"""Generate the API reference (docs/api.md) from the comments in protos/*.proto.

``python -m server.apidoc > docs/api.md`` (or ``make docs``); a test fails when the file and
the .proto comments disagree.
"""

from __future__ import annotations

import sys
import tempfile
from importlib import resources
from pathlib import Path

from google.protobuf import descriptor_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
FILES = ["common", "quota_ledger", "accounts", "settlement", "test_clock"]
# SourceCodeInfo path numbers (descriptor.proto field numbers).
MESSAGE, FIELD, ENUM, ENUM_VALUE, SERVICE, METHOD = 4, 2, 5, 2, 6, 2


def descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    include = str(resources.files("grpc_tools") / "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", "--include_source_info",
                f"--descriptor_set_out={out}",
                *[f"quota_ledger/v1/{name}.proto" for name in FILES]]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed")
        fds = descriptor_pb2.FileDescriptorSet()
        fds.ParseFromString(out.read_bytes())
        return fds


def _comments(f: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    out = {}
    for loc in f.source_code_info.location:
        text = (loc.leading_comments or loc.trailing_comments).strip()
        if text:
            out[tuple(loc.path)] = " ".join(line.strip() for line in text.splitlines())
    return out


def _type_name(fd: descriptor_pb2.FieldDescriptorProto) -> str:
    if fd.type_name:
        name = fd.type_name.rsplit(".", 1)[-1]
    else:
        name = descriptor_pb2.FieldDescriptorProto.Type.Name(fd.type)[5:].lower()
    if fd.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED:
        return f"repeated {name}"
    return name


def render() -> str:
    out = ["# API reference: `quota_ledger.v1`", "",
           "Generated from the comments in `protos/quota_ledger/v1/*.proto` by "
           "`make docs`; do not edit by hand.", ""]
    for f in descriptor_set().file:
        c = _comments(f)
        out += [f"## {f.name}", ""]
        for si, svc in enumerate(f.service):
            out += [f"### service `{svc.name}`", "", c.get((SERVICE, si), ""), "",
                    "| RPC | request | response | description |", "|---|---|---|---|"]
            for mi, m in enumerate(svc.method):
                req = ("stream " if m.client_streaming else "") + m.input_type.rsplit(".", 1)[-1]
                res = ("stream " if m.server_streaming else "") + m.output_type.rsplit(".", 1)[-1]
                out.append(f"| `{m.name}` | `{req}` | `{res}` | "
                           f"{c.get((SERVICE, si, METHOD, mi), '')} |")
            out.append("")
        for ei, en in enumerate(f.enum_type):
            out += [f"### enum `{en.name}`", "", c.get((ENUM, ei), ""), "",
                    "| value | number | description |", "|---|---|---|"]
            for vi, v in enumerate(en.value):
                out.append(f"| `{v.name}` | {v.number} | {c.get((ENUM, ei, ENUM_VALUE, vi), '')} |")
            out.append("")
        for mi, msg in enumerate(f.message_type):
            out += [f"### message `{msg.name}`", "", c.get((MESSAGE, mi), ""), "",
                    "| field | type | number | description |", "|---|---|---|---|"]
            for fi, fd in enumerate(msg.field):
                out.append(f"| `{fd.name}` | `{_type_name(fd)}` | {fd.number} | "
                           f"{c.get((MESSAGE, mi, FIELD, fi), '')} |")
            out.append("")
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
