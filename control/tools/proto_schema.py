#!/usr/bin/env python3
"""Writes control/src/protobuf/schema.txt from the Kubernetes generated.proto files.

Usage: proto_schema.py API_REPO APIMACHINERY_REPO > control/src/protobuf/schema.txt
(git checkouts of k8s.io/api and k8s.io/apimachinery). One line per field:
  <message> <json name> <number> <optional|repeated|map> <type>
Message and type names are fully qualified proto names; map types are written KEY,VALUE.
"""
import re
import subprocess
import sys

API, MACH = sys.argv[1], sys.argv[2]
FILES = [
    (API, "core/v1/generated.proto"),
    (API, "apps/v1/generated.proto"),
    (API, "authentication/v1/generated.proto"),
    (API, "authorization/v1/generated.proto"),
    (API, "discovery/v1/generated.proto"),
    (API, "coordination/v1/generated.proto"),
    (API, "rbac/v1/generated.proto"),
    (MACH, "pkg/apis/meta/v1/generated.proto"),
    (MACH, "pkg/util/intstr/generated.proto"),
    (MACH, "pkg/api/resource/generated.proto"),
    (MACH, "pkg/runtime/generated.proto"),
]
SCALARS = {"string", "int32", "int64", "bool", "bytes", "double", "float", "uint32", "uint64", "fixed64", "fixed32", "sint64", "sint32"}
FIELD = re.compile(r"^\s*(optional|repeated)\s+([\w.]+)\s+(\w+)\s*=\s*(\d+)")
MAP = re.compile(r"^\s*map<\s*([\w.]+)\s*,\s*([\w.]+)\s*>\s+(\w+)\s*=\s*(\d+)")

def show(repo, path):
    return subprocess.check_output(["git", "-C", repo, "show", "HEAD:" + path], text=True)

messages = {}
for repo, path in FILES:
    text = show(repo, path)
    pkg = re.search(r"^package ([\w.]+);", text, re.M).group(1)
    stack = []
    for line in text.splitlines():
        line = line.split("//")[0]
        m = re.match(r"^\s*message (\w+) \{", line)
        if m:
            stack.append(m.group(1))
            messages.setdefault(pkg + "." + ".".join(stack), (pkg, []))
            continue
        if re.match(r"^\s*\}", line) and stack:
            stack.pop()
            continue
        if not stack:
            continue
        name = pkg + "." + ".".join(stack)
        f = FIELD.match(line)
        if f:
            messages[name][1].append((f.group(3), f.group(4), f.group(1), f.group(2)))
            continue
        f = MAP.match(line)
        if f:
            messages[name][1].append((f.group(3), f.group(4), "map", f.group(1) + "," + f.group(2)))

def resolve(pkg, t):
    if t in SCALARS:
        return t
    t = t.lstrip(".")
    if t in messages:
        return t
    if pkg + "." + t in messages:
        return pkg + "." + t
    return t  # unknown message: its fields are kept undecoded (skipped)

for name in sorted(messages):
    pkg, fields = messages[name]
    for json_name, num, label, typ in fields:
        if label == "map":
            k, v = typ.split(",")
            typ = resolve(pkg, k) + "," + resolve(pkg, v)
        else:
            typ = resolve(pkg, typ)
        print(name, json_name, num, label, typ)
