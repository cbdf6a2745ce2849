#!/usr/bin/env python3
"""Writes a container image as a docker-archive tarball (the `docker save` layout), from files on
this machine, without a Docker engine or a registry. `ctr images import` reads it.

One layer holds every file. ELF files bring the shared libraries that `ldd` names, at the paths
it names (the dynamic loader included), so a binary linked against the host's libc runs as it
does on the host. Timestamps are zero and entries sorted, so the same inputs give the same image
digest.

    image.py --tag ghcr.io/wsfleet/wsfleet-server:0.1.0 --out server.tar \\
        --entrypoint /usr/local/bin/wsfleet-server --user 65532:65532 \\
        --file target/release/wsfleet-server:/usr/local/bin/wsfleet-server
"""

import argparse
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile

PASSWD = "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n"
GROUP = "root:x:0:\nnonroot:x:65532:\n"


def ldd_libraries(path):
    """Absolute paths of the shared libraries (and loader) that `path` needs; none if static."""
    out = subprocess.run(["ldd", path], capture_output=True, text=True)
    if out.returncode != 0 or "not a dynamic executable" in out.stdout + out.stderr:
        return []
    libs = []
    for line in out.stdout.splitlines():
        if "not found" in line:
            sys.exit(f"image.py: {path} needs a library this machine lacks: {line.strip()}")
        m = re.search(r"(/\S+) \(0x", line)
        if m:
            libs.append(m.group(1))
    return libs


def is_elf(path):
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


class Layer:
    """The one layer: a tar built in memory, its parent directories added as needed."""

    def __init__(self):
        self.entries = {}  # path in image -> (TarInfo, bytes or None)

    def _dirs(self, dest):
        parts = dest.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self.entries:
                self.add_dir("/" + d, 0o755)

    def add_dir(self, dest, mode):
        info = tarfile.TarInfo(dest.strip("/"))
        info.type, info.mode = tarfile.DIRTYPE, mode
        self._dirs(dest)
        self.entries[info.name] = (info, None)

    def add_bytes(self, dest, data, mode):
        info = tarfile.TarInfo(dest.strip("/"))
        info.size, info.mode = len(data), mode
        self._dirs(dest)
        self.entries[info.name] = (info, data)

    def add_file(self, src, dest, mode=None):
        with open(src, "rb") as f:
            data = f.read()
        self.add_bytes(dest, data, mode if mode is not None else os.stat(src).st_mode & 0o7777)

    def tar(self):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
            for name in sorted(self.entries):
                info, data = self.entries[name]
                info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "root", "root"
                t.addfile(info, io.BytesIO(data) if data is not None else None)
        return buf.getvalue()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tag", required=True, action="append", help="image name:tag (repeatable)")
    p.add_argument("--out", required=True, help="tarball to write")
    p.add_argument("--file", action="append", default=[], metavar="SRC:DEST",
                   help="a file from this machine (symlinks followed); ELF files bring their libraries")
    p.add_argument("--dir", action="append", default=[], metavar="DEST[:MODE]", help="an empty directory")
    p.add_argument("--entrypoint", help="entrypoint, one argument")
    p.add_argument("--cmd", action="append", default=[], help="default command (repeatable: one argument each)")
    p.add_argument("--user", default="65532:65532")
    p.add_argument("--env", action="append", default=[], metavar="K=V")
    p.add_argument("--expose", action="append", default=[], metavar="PORT")
    p.add_argument("--workdir", default="/")
    p.add_argument("--passwd-line", action="append", default=[], help="an extra /etc/passwd line (user:x:uid:gid:...)")
    a = p.parse_args()

    layer = Layer()
    layer.add_dir("/tmp", 0o1777)
    passwd, group = PASSWD, GROUP
    for line in a.passwd_line:
        name, _, uid, gid = line.split(":")[:4]
        passwd += line + "\n"
        group += f"{name}:x:{gid}:\n"
    layer.add_bytes("/etc/passwd", passwd.encode(), 0o644)
    layer.add_bytes("/etc/group", group.encode(), 0o644)
    libs = set()
    for spec in a.file:
        src, dest = spec.split(":", 1)
        real = os.path.realpath(src)
        layer.add_file(real, dest)
        if is_elf(real):
            libs.update(ldd_libraries(real))
    for lib in sorted(libs):
        layer.add_file(os.path.realpath(lib), lib, 0o755)
    for spec in a.dir:
        dest, _, mode = spec.partition(":")
        layer.add_dir(dest, int(mode or "755", 8))

    layer_tar = layer.tar()
    diff_id = "sha256:" + hashlib.sha256(layer_tar).hexdigest()
    env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"] + a.env
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "User": a.user,
            "Env": env,
            "WorkingDir": a.workdir,
            "Entrypoint": [a.entrypoint] if a.entrypoint else None,
            "Cmd": a.cmd or None,
            "ExposedPorts": {f"{port}/tcp": {} for port in a.expose} or None,
            "Labels": {"org.opencontainers.image.source": "https://github.com/wsfleet/wsfleet"},
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "images/image.py"}],
    }
    config_json = json.dumps(config, sort_keys=True).encode()
    config_name = hashlib.sha256(config_json).hexdigest() + ".json"
    layer_name = diff_id[len("sha256:"):] + "/layer.tar"
    manifest = [{"Config": config_name, "RepoTags": a.tag, "Layers": [layer_name]}]

    tmp = a.out + ".tmp"
    with tarfile.open(tmp, mode="w") as out:
        for name, data in [(config_name, config_json), (layer_name, layer_tar),
                           ("manifest.json", json.dumps(manifest).encode())]:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            out.addfile(info, io.BytesIO(data))
    os.replace(tmp, a.out)
    print(f"{a.out}: {', '.join(a.tag)} ({len(layer_tar) // 1024} KiB, {len(libs)} libraries)")


if __name__ == "__main__":
    main()
