"""Build the demo/test model image offline: no registry, no Dockerfile, no base image.

The root filesystem holds Debian's /usr/bin/python3.11, the libraries `ldd` names for it,
/usr/lib/python3.11 (tests and caches left out), demo/model_server.py (its command) and
demo/stream_model.py (the benchmarks' lean streaming model); it is imported into
the engine with the docker SDK (`docker import`). About 50 MB, about a second. The image is
rebuilt only when those two or this file change (a content label says which).

    python demo/build_image.py [--tag berth-demo/model:latest]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import docker
import docker.errors

HERE = Path(__file__).resolve().parent
PYTHON = "/usr/bin/python3.11"
STDLIB = "/usr/lib/python3.11"
DEFAULT_TAG = "berth-demo/model:latest"
SERVERS = ("model_server.py", "stream_model.py")  # copied into /srv
SKIP = re.compile(r"/(test|tests|idlelib|tkinter|turtledemo|ensurepip|__pycache__)(/|$)")


def content_hash() -> str:
    digest = hashlib.sha256()
    for name in (*SERVERS, "build_image.py"):
        digest.update((HERE / name).read_bytes())
    return digest.hexdigest()[:16]


def shared_libraries(binary: str) -> list[str]:
    out = subprocess.run(["ldd", binary], check=True, capture_output=True, text=True).stdout
    paths = re.findall(r"(/\S+\.so[.\d]*)", out)
    return sorted(set(paths))


def add_path(tar: tarfile.TarFile, path: str) -> None:
    """Add a file with its parent dirs; symlinks are followed so the copy stands alone."""
    real = os.path.realpath(path)
    info = tar.gettarinfo(real, arcname=path.lstrip("/"))
    info.uid = info.gid = 0
    with open(real, "rb") as f:
        tar.addfile(info, f)


def build_rootfs(out: Path) -> None:
    with tarfile.open(out, "w") as tar:
        for directory in ("tmp", "srv", "etc"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if directory == "tmp" else 0o755
            tar.addfile(info)
        for path in [PYTHON, *shared_libraries(PYTHON)]:
            add_path(tar, path)
        for root, dirs, files in os.walk(STDLIB):
            dirs[:] = [d for d in dirs if not SKIP.search(f"{root}/{d}")]
            for name in files:
                if not name.endswith((".pyc", ".pyo")):
                    add_path(tar, os.path.join(root, name))
        for name in SERVERS:
            server = (HERE / name).read_bytes()
            info = tarfile.TarInfo(f"srv/{name}")
            info.size, info.mode = len(server), 0o644
            tar.addfile(info, io.BytesIO(server))
        passwd = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n"
        info = tarfile.TarInfo("etc/passwd")
        info.size = len(passwd)
        tar.addfile(info, io.BytesIO(passwd))


def ensure_image(client: docker.DockerClient, tag: str = DEFAULT_TAG, force: bool = False) -> str:
    """The image's id, building it first if it is missing or out of date."""
    wanted = content_hash()
    try:
        image = client.images.get(tag)
        if not force and image.labels.get("berth.build") == wanted:
            return str(image.id)
    except docker.errors.ImageNotFound:
        pass
    repo, _, version = tag.partition(":")
    with tempfile.TemporaryDirectory() as tmp:
        rootfs = Path(tmp) / "rootfs.tar"
        build_rootfs(rootfs)
        client.api.import_image_from_file(
            str(rootfs), repository=repo, tag=version or "latest",
            changes=[f'CMD ["{PYTHON}", "-u", "/srv/model_server.py"]',
                     "ENV PORT=8080 PYTHONDONTWRITEBYTECODE=1",
                     "EXPOSE 8080", f"LABEL berth.build={wanted}"])
    return str(client.images.get(tag).id)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", default=DEFAULT_TAG)
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args()
    client = docker.from_env()
    print(f"{args.tag}: {ensure_image(client, args.tag, args.force)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
