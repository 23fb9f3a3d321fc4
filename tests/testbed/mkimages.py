#!/usr/bin/env python3
"""Builds the test images as OCI image layouts, reproducibly, from Debian's busybox-static.

Every file gets mtime 0 and uid/gid 0 unless a test needs otherwise, gzip headers carry no time,
so the digests are the same on every machine with the same busybox package.
"""
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

BUSYBOX = "/bin/busybox"


def blob(layout, data, media_type):
    digest = hashlib.sha256(data).hexdigest()
    path = os.path.join(layout, "blobs", "sha256", digest)
    if not os.path.exists(path):
        with open(path, "wb") as f:
            f.write(data)
    return {"mediaType": media_type, "digest": "sha256:" + digest, "size": len(data)}


class Layer:
    def __init__(self):
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)

    def _info(self, name, kind, mode, uid=0, gid=0):
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = kind, mode, uid, gid, 0
        return ti

    def dir(self, name, mode=0o755, uid=0, gid=0):
        self.tar.addfile(self._info(name, tarfile.DIRTYPE, mode, uid, gid))

    def file(self, name, data, mode=0o644, uid=0, gid=0, xattrs=None):
        ti = self._info(name, tarfile.REGTYPE, mode, uid, gid)
        ti.size = len(data)
        if xattrs:
            ti.pax_headers = {"SCHILY.xattr." + k: v for k, v in xattrs.items()}
        self.tar.addfile(ti, io.BytesIO(data))

    def symlink(self, name, target):
        ti = self._info(name, tarfile.SYMTYPE, 0o777)
        ti.linkname = target
        self.tar.addfile(ti)

    def hardlink(self, name, target):
        ti = self._info(name, tarfile.LNKTYPE, 0o644)
        ti.linkname = target
        self.tar.addfile(ti)

    def done(self):
        self.tar.close()
        raw = self.buf.getvalue()
        gz = io.BytesIO()
        with gzip.GzipFile(fileobj=gz, mode="wb", mtime=0, compresslevel=6) as g:
            g.write(raw)
        return raw, gz.getvalue()


def base_layer():
    layer = Layer()
    for d in ["bin", "etc", "tmp", "root", "home", "var", "usr", "usr/bin", "proc", "sys", "dev"]:
        layer.dir(d, 0o1777 if d == "tmp" else 0o755)
    with open(BUSYBOX, "rb") as f:
        layer.file("bin/busybox", f.read(), 0o755)
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in sorted(set(applets)):
        if applet != "busybox":
            layer.symlink("bin/" + applet, "busybox")
    layer.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\napp:x:1000:1000:app:/home:/bin/sh\n")
    layer.file("etc/group", b"root:x:0:\nnobody:x:65534:\napp:x:1000:\n")
    return layer.done()


def whiteout_layers():
    """Two layers on top of busybox exercising whiteouts, opaque dirs, links, ownership, modes, xattrs."""
    one = Layer()
    one.dir("data")
    one.file("data/removed", b"gone\n")
    one.file("data/kept", b"kept\n", 0o600, uid=1000, gid=1000)
    one.dir("opaque")
    one.file("opaque/old", b"old\n")
    one.dir("opaque/sub")
    one.file("opaque/sub/older", b"older\n")
    one.file("data/original", b"linked\n")
    one.hardlink("data/hardlink", "data/original")
    one.symlink("data/symlink", "/data/kept")
    one.file("data/xattr", b"x\n", xattrs={"user.oxlet": "yes"})
    one.file("data/setuid", b"s\n", 0o4755)
    two = Layer()
    two.dir("data")
    two.file("data/.wh.removed", b"")
    two.dir("opaque")
    two.file("opaque/.wh..wh..opq", b"")
    two.file("opaque/new", b"new\n")
    two.file("data/added", b"added\n")
    return [one.done(), two.done()]


def zstd_layer(raw):
    gz = subprocess.run(["zstd", "-q", "-c", "-3"], input=raw, capture_output=True, check=True).stdout
    return raw, gz


def write_image(layout, tag, layers, config_extra, annotations=None, layer_type="tar+gzip"):
    diff_ids = ["sha256:" + hashlib.sha256(raw).hexdigest() for raw, _ in layers]
    config = {
        "created": "1970-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": config_extra,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "oxlet tests/testbed/mkimages.py"} for _ in layers],
    }
    cfg = blob(layout, json.dumps(config, sort_keys=True).encode(), "application/vnd.oci.image.config.v1+json")
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": cfg,
        "layers": [blob(layout, gz, "application/vnd.oci.image.layer.v1." + layer_type) for _, gz in layers],
    }
    return add_to_index(layout, tag, manifest, "application/vnd.oci.image.manifest.v1+json", annotations)


def add_to_index(layout, tag, doc, media_type, annotations=None):
    desc = blob(layout, json.dumps(doc, sort_keys=True).encode(), media_type)
    index_path = os.path.join(layout, "index.json")
    with open(index_path) as f:
        index = json.load(f)
    index["manifests"] = [m for m in index["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != tag]
    entry = dict(desc)
    entry["annotations"] = {"org.opencontainers.image.ref.name": tag, **(annotations or {})}
    index["manifests"].append(entry)
    with open(index_path, "w") as f:
        json.dump(index, f, sort_keys=True)
    return desc


def main():
    layout = sys.argv[1]
    os.makedirs(os.path.join(layout, "blobs", "sha256"), exist_ok=True)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": []}, f)
    env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    base = base_layer()
    amd64 = write_image(layout, "busybox", [base], {"Env": env, "Cmd": ["sh"]})
    write_image(layout, "busybox-zstd", [zstd_layer(base[0])], {"Env": env, "Cmd": ["sh"]}, layer_type="tar+zstd")
    write_image(layout, "layers", [base] + whiteout_layers(), {"Env": env, "Cmd": ["sh"], "WorkingDir": "/data"})
    write_image(layout, "entrypoint", [base], {
        "Env": env + ["GREETING=from-image"], "Entrypoint": ["echo", "entry"], "Cmd": ["default-cmd"],
        "WorkingDir": "/tmp", "User": "1000:1000"})
    # An image index whose linux/amd64 entry is busybox; the arm64 entry points to a config-less manifest
    # that must never be chosen on this machine.
    arm = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
           "config": blob(layout, b'{"architecture":"arm64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}',
                          "application/vnd.oci.image.config.v1+json"), "layers": []}
    arm_desc = blob(layout, json.dumps(arm, sort_keys=True).encode(), "application/vnd.oci.image.manifest.v1+json")
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
        dict(arm_desc, platform={"architecture": "arm64", "os": "linux"}),
        dict(amd64, platform={"architecture": "amd64", "os": "linux"}),
    ]}
    add_to_index(layout, "multiarch", index, "application/vnd.oci.image.index.v1+json")
    # A manifest whose config blob is not JSON: pulls, but cannot be inspected.
    bad_cfg = blob(layout, b"this is not json", "application/vnd.oci.image.config.v1+json")
    add_to_index(layout, "corrupt", {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                                     "config": bad_cfg, "layers": []}, "application/vnd.oci.image.manifest.v1+json")


if __name__ == "__main__":
    main()
