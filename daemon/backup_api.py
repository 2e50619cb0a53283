"""`GET /v1/backup` (admin): a consistent online copy of the state database, streamed.

The copy is made with SQLite's backup API into `state_dir/backups/` (one read transaction:
calls and tasks keep flowing), streamed to the client and deleted, also when the client
leaves. Without room for it the answer is 507 before anything is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import sqlite3
import time
from pathlib import Path

from aiohttp import web

from berth.daemon.errors import ApiError, storage_error
from berth.daemon.keys import STORE
from berth.store.backup import BACKUPS, copy_database

CHUNK = 256 * 1024
MARGIN = 16 * 1024 ** 2  # room left on the disk after the copy


async def get_backup(request: web.Request) -> web.StreamResponse:
    store = request.app[STORE]
    db = store.path
    folder = db.parent / BACKUPS
    need, free = store.retention.size(), shutil.disk_usage(db.parent).free
    if free < need + MARGIN:
        raise ApiError(507, "insufficient_storage", f"a backup needs about {need + MARGIN} "
                       f"bytes free in {db.parent}; {free} are")
    copy = folder / f".backup-{secrets.token_hex(8)}.db"
    loop = asyncio.get_running_loop()
    job = loop.run_in_executor(None, copy_database, db, copy)
    try:
        try:
            await asyncio.shield(job)
        except (OSError, sqlite3.Error) as exc:
            raise storage_error(exc) from exc
        return await _send(request, copy)
    finally:
        if not job.done():  # the client left during the copy: let it end, then delete it
            with contextlib.suppress(Exception):
                await job
        copy.unlink(missing_ok=True)


async def _send(request: web.Request, copy: Path) -> web.StreamResponse:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    response = web.StreamResponse(headers={
        "Content-Type": "application/vnd.sqlite3",
        "Content-Disposition": f'attachment; filename="berth-{stamp}.db"'})
    file = await asyncio.to_thread(open, copy, "rb")
    try:
        response.content_length = os.fstat(file.fileno()).st_size
        await response.prepare(request)
        while chunk := await asyncio.to_thread(file.read, CHUNK):
            await response.write(chunk)
    finally:
        file.close()
    await response.write_eof()
    return response
