"""A minimal Docker registry (HTTP API v2, pull only) serving one image, for pull tests.

No registry is reachable from this machine and none is installed, so the test serves the
demo image itself, exported with `docker save`. Engines treat 127.0.0.0/8 registries as
insecure by default, so plain HTTP works without engine configuration.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field

from aiohttp import web

MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"


@dataclass
class ServedImage:
    manifest: bytes
    blobs: dict[str, bytes] = field(default_factory=dict)  # digest -> content

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.manifest).hexdigest()


def from_docker_save(saved: bytes) -> ServedImage:
    """Manifest and blobs from a `docker save` archive of one image."""
    with tarfile.open(fileobj=io.BytesIO(saved)) as tar:
        [entry] = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        config = tar.extractfile(entry["Config"]).read()  # type: ignore[union-attr]
        layers = [tar.extractfile(name).read() for name in entry["Layers"]]  # type: ignore[union-attr]
    blobs = {_digest(b): b for b in (config, *layers)}
    manifest = {
        "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                   "size": len(config), "digest": _digest(config)},
        # Uncompressed tars under the gzip type: engines detect the compression themselves.
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                    "size": len(layer), "digest": _digest(layer)} for layer in layers],
    }
    return ServedImage(manifest=json.dumps(manifest).encode(), blobs=blobs)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def registry_app(image: ServedImage) -> web.Application:
    async def root(request: web.Request) -> web.Response:
        return web.json_response({}, headers={"Docker-Distribution-API-Version": "registry/2.0"})

    async def manifest(request: web.Request) -> web.Response:
        return web.Response(body=image.manifest, content_type=MANIFEST_TYPE,
                            headers={"Docker-Content-Digest": image.digest})

    async def blob(request: web.Request) -> web.Response:
        data = image.blobs.get(request.match_info["digest"])
        if data is None:
            raise web.HTTPNotFound()
        return web.Response(body=data, content_type="application/octet-stream",
                            headers={"Docker-Content-Digest": request.match_info["digest"]})

    app = web.Application()
    app.router.add_get("/v2/", root)
    app.router.add_get(r"/v2/{name:.+}/manifests/{ref}", manifest)
    app.router.add_get(r"/v2/{name:.+}/blobs/{digest}", blob)
    return app


def tiny_rootfs(marker: str) -> bytes:
    """A one-file root filesystem (about 200 kB) to import, save and serve as an image."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = f"made by {marker}\n".encode() * 20000
        info = tarfile.TarInfo("hello.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
