"""Real protocol servers on localhost for the adapter-source tests: an S3 endpoint (moto's
server mode) and a Hugging Face hub endpoint serving repos from a local folder.

The hub server answers the two calls `huggingface_hub` makes to fetch files at a revision:
`GET /api/models/{repo}/revision/{revision}` (the commit and its file list, with sizes) and
`GET|HEAD /{repo}/resolve/{revision}/{file}` (the bytes, with the commit and an ETag in headers),
and the three it makes to publish (`create_repo`, then `create_commit` with every file sent
inline): `POST /api/repos/create`, `POST /api/models/{repo}/preupload/{revision}` and
`POST /api/models/{repo}/commit/{revision}` (NDJSON: a header, then the files, base64).
A repo is a folder `<root>/<org>/<name>/<revision>/`: each subfolder is one revision, and the
commit id is a hash of its files, so a changed folder is a new commit.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response

from tests.support import free_port


def _commit(folder: Path) -> str:
    digest = hashlib.sha1()
    for path in sorted(folder.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def hub_app(root: Path) -> FastAPI:
    app = FastAPI()
    commits: dict[str, Path] = {}  # commit id -> the revision folder it names

    def revision_folder(org: str, name: str, revision: str) -> Path:
        if revision in commits:
            return commits[revision]
        folder = root / org / name / revision
        if not folder.is_dir():
            raise HTTPException(404, headers={"X-Error-Code": "RevisionNotFound"})
        commits[_commit(folder)] = folder
        return folder

    @app.get("/api/models/{org}/{name}")
    @app.get("/api/models/{org}/{name}/revision/{revision}")
    async def info(org: str, name: str, revision: str = "main") -> JSONResponse:
        folder = revision_folder(org, name, revision)
        siblings = [{"rfilename": p.name, "size": p.stat().st_size} for p in sorted(folder.iterdir())]
        return JSONResponse({"id": f"{org}/{name}", "sha": _commit(folder), "siblings": siblings, "private": False})

    @app.post("/api/repos/create")
    async def create(request: Request) -> JSONResponse:
        body = await request.json()
        org, name = body.get("organization") or "user", body["name"]
        folder = root / org / name / "main"
        if folder.is_dir():  # as the hub answers: huggingface_hub reads the url even from a 409
            body = {"error": "You already created this model repo", "url": f"{request.base_url}{org}/{name}"}
            return JSONResponse(body, status_code=409)
        folder.mkdir(parents=True)
        return JSONResponse({"url": f"{request.base_url}{org}/{name}"})

    @app.post("/api/models/{org}/{name}/preupload/{revision}")
    async def preupload(org: str, name: str, revision: str, request: Request) -> JSONResponse:
        files = (await request.json())["files"]
        modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
        return JSONResponse({"files": modes})

    @app.post("/api/models/{org}/{name}/commit/{revision}")
    async def commit(org: str, name: str, revision: str, request: Request) -> JSONResponse:
        folder = root / org / name / revision
        folder.mkdir(parents=True, exist_ok=True)
        for line in (await request.body()).splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                value = item["value"]
                (folder / value["path"]).write_bytes(base64.b64decode(value["content"]))
            elif item["key"] != "header":
                raise HTTPException(400, f"this test hub takes inline files only, not {item['key']}")
        sha = _commit(folder)
        return JSONResponse({"commitUrl": f"{request.base_url}{org}/{name}/commit/{sha}", "commitOid": sha})

    @app.api_route("/{org}/{name}/resolve/{revision}/{filename}", methods=["GET", "HEAD"])
    async def resolve(org: str, name: str, revision: str, filename: str, request: Request) -> Response:
        folder = revision_folder(org, name, revision)
        path = folder / filename
        if not path.is_file():
            raise HTTPException(404, headers={"X-Error-Code": "EntryNotFound"})
        data = path.read_bytes()
        headers = {
            "X-Repo-Commit": _commit(folder),
            "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
            "Content-Length": str(len(data)),
        }
        return Response(b"" if request.method == "HEAD" else data, headers=headers)

    return app


@contextlib.contextmanager
def hub_server(root: Path) -> Iterator[str]:
    """Serve `root` as a hub endpoint; yields its URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(hub_app(root), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """moto's S3 server on a free port, with test credentials in the environment."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": url,
    }
    try:
        with environment(env):
            yield url
    finally:
        server.stop()


@contextlib.contextmanager
def gcs_server(bucket: str) -> Iterator[str]:
    """A Google Cloud Storage emulator (gcp-storage-emulator) with `bucket`, in memory; gcsfs
    finds it through STORAGE_EMULATOR_HOST."""
    from gcp_storage_emulator.server import create_server

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    url = f"http://127.0.0.1:{port}"
    # NO_GCE_CHECK: google-auth does not probe for a metadata server (seconds offline).
    try:
        with environment({"STORAGE_EMULATOR_HOST": url, "NO_GCE_CHECK": "True"}):
            yield url
    finally:
        server.stop()


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block, then restore what was there."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
