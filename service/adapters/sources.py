"""Where adapter packages come from: a local directory, a Hugging Face hub repo, object storage.

A source is named by a string, the `lora_path` of vLLM's `POST /v1/load_lora_adapter`:

- a local directory: an absolute path, or one starting with `.` (`./adapters/dolly`);
- the hub: `hf://org/repo`, `hf://org/repo@revision`, or a bare `org/repo[@revision]` (as vLLM
  takes a hub id for `lora_path`), fetched with `huggingface_hub` (`HF_ENDPOINT`, `HF_TOKEN`
  as usual);
- object storage: `s3://bucket/prefix`, `gs://bucket/prefix` (also `gcs://`), through fsspec
  (`s3fs` / `gcsfs`, credentials and `AWS_ENDPOINT_URL` as those libraries read them).

Only the package's files are fetched (`PACKAGE_FILES`), never anything else in the repo or
bucket, and only from a prefix the operator allowed (`ADAPTER_SOURCES`). Remote packages land
in `<cache>/<name>/<version>` atomically: they are downloaded into a staging directory beside it,
validated by the registry, and renamed into place, so a reader never sees half a package
(`service.adapters.downloads`, which also keeps replicas sharing the cache from deleting each
other's versions).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from service.adapters.manifest import MANIFEST_FILE

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PACKAGE_FILES = (CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE)
REMOTE_SCHEMES = ("s3", "gs", "gcs")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class SourceError(Exception):
    """A source that cannot be used: malformed, not allowed, unreachable, or too large."""


@dataclass(frozen=True)
class Source:
    kind: str  # "local", "hub", "fsspec"
    location: str  # a resolved local path, a hub repo id, or a URL without a trailing slash
    revision: str | None = None  # hub only

    @property
    def remote(self) -> bool:
        return self.kind != "local"

    def __str__(self) -> str:
        if self.kind == "hub":
            return f"hf://{self.location}" + (f"@{self.revision}" if self.revision else "")
        return self.location


def parse_source(spec: str) -> Source:
    """Name -> Source; raises SourceError for what is none of the three kinds."""
    spec = spec.strip()
    if not spec:
        raise SourceError("the source is empty")
    if "::" in spec or any(c in spec for c in "?#") or any(c.isspace() for c in spec):
        # fsspec chains (`simplecache::s3://...`) and query or fragment parts reach places the
        # operator's prefixes do not name (security review M6)
        raise SourceError(f"{spec!r}: '::', '?', '#' and whitespace are not allowed in a source")
    scheme, sep, rest = spec.partition("://")
    if sep:
        scheme = scheme.lower()
        if scheme == "hf":
            return _hub(rest, spec)
        if scheme in REMOTE_SCHEMES:
            bucket = rest.split("/", 1)[0]
            if not bucket or ".." in rest.split("/"):
                raise SourceError(f"{spec!r} is not a valid {scheme}:// URL")
            return Source("fsspec", f"{scheme}://{rest.rstrip('/')}")
        if scheme == "file":
            return Source("local", str(Path(rest).resolve()))
        raise SourceError(f"unsupported source scheme {scheme!r}; use a path, hf://, s3:// or gs://")
    if spec.startswith(("/", ".", "~")) or Path(spec).is_dir():
        return Source("local", str(Path(spec).expanduser().resolve()))
    return _hub(spec, spec)


def _hub(rest: str, spec: str) -> Source:
    repo, _, revision = rest.partition("@")
    if not _HUB_ID.fullmatch(repo) or ".." in repo:
        raise SourceError(f"{spec!r} is neither a local directory nor a hub repo id (org/name)")
    return Source("hub", repo, revision or None)


def allowed(source: Source, prefixes: list[str], adapter_dir: Path) -> bool:
    """Whether the operator allowed this source: it lies under the adapter directory or under one
    of `prefixes` (paths, `hf://org/` or `hf://org/repo`, `s3://bucket/prefix/`...). A prefix
    matches whole path components only (`s3://b/team` does not allow `s3://b/team-x`)."""
    if source.kind == "local":
        path = Path(source.location)
        roots = [adapter_dir.resolve()] + [Path(p).expanduser().resolve() for p in prefixes if "://" not in p]
        return any(path == root or root in path.parents for root in roots)
    if source.kind == "hub" and (source.revision or "").startswith("refs/pr/"):
        # A pull request's revision is anyone's upload to the repo: only a prefix that names
        # this repo and this revision allows it (security review M6).
        return f"hf://{source.location}@{source.revision}" in [p.rstrip("/") for p in prefixes]
    target = str(source).split("@", 1)[0] if source.kind == "hub" else source.location
    for prefix in prefixes:
        if "://" not in prefix:
            continue
        prefix = prefix.rstrip("/")
        if target == prefix or target.startswith(prefix + "/"):
            return True
    return False


def content_version(directory: Path) -> str:
    """The package's version: a hash of its three files' names and bytes (16 hex digits)."""
    return version_of({name: (directory / name).read_bytes() for name in PACKAGE_FILES})


def version_of(blobs: dict[str, bytes]) -> str:
    """`content_version` of a package already read into memory."""
    digest = hashlib.sha256()
    for name in PACKAGE_FILES:
        digest.update(name.encode() + b"\0" + hashlib.sha256(blobs[name]).digest())
    return digest.hexdigest()[:16]


def fetch(source: Source, target: Path, *, max_bytes: int) -> None:
    """Download a remote package's files into the empty directory `target`."""
    try:
        if source.kind == "hub":
            _fetch_hub(source, target, max_bytes)
        elif source.kind == "fsspec":
            _fetch_fsspec(source, target, max_bytes)
        else:
            raise SourceError(f"{source} is not remote")
    except SourceError:
        raise
    except ImportError as exc:
        raise SourceError(f"{source}: {exc.name} is not installed (pip install 'hotswap[storage]')") from exc
    except Exception as exc:  # network, credentials, missing objects: the library's own words
        raise SourceError(f"cannot fetch {source}: {type(exc).__name__}: {exc}") from exc
    check_size(target, max_bytes, str(source))


def check_size(directory: Path, max_bytes: int, label: str) -> None:
    size = sum((directory / n).stat().st_size for n in PACKAGE_FILES if (directory / n).is_file())
    if size > max_bytes:
        raise SourceError(f"{label} is {size} bytes, over MAX_ADAPTER_BYTES ({max_bytes})")


class _Budget:
    """MAX_ADAPTER_BYTES over a package's files, counted on the bytes as they arrive: a listing
    can under-report a size (or omit it), and an object can be rewritten between its listing and
    its download (security review M6)."""

    def __init__(self, source: Source, max_bytes: int):
        self.source, self.left, self.max_bytes = source, max_bytes, max_bytes

    def copy(self, chunks: Iterable[bytes], path: Path) -> None:
        with path.open("wb") as out:
            for chunk in chunks:
                self.left -= len(chunk)
                if self.left < 0:
                    raise SourceError(f"{self.source} is over MAX_ADAPTER_BYTES ({self.max_bytes}) as it downloads")
                out.write(chunk)


def _fetch_hub(source: Source, target: Path, max_bytes: int) -> None:
    from huggingface_hub import HfApi, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session

    endpoint = os.environ.get("HF_ENDPOINT") or None
    api = HfApi(endpoint=endpoint)
    info = api.model_info(source.location, revision=source.revision, files_metadata=True)
    sizes = {s.rfilename: s.size for s in info.siblings or []}
    missing = [n for n in PACKAGE_FILES if n not in sizes]
    if missing:
        raise SourceError(f"{source} has no {', '.join(missing)}")
    total = sum(sizes[n] or 0 for n in PACKAGE_FILES)  # a first check; the budget is on the bytes
    if total > max_bytes:
        raise SourceError(f"{source} is {total} bytes, over MAX_ADAPTER_BYTES ({max_bytes})")
    budget, session, headers = _Budget(source, max_bytes), get_session(), build_hf_headers()
    for name in PACKAGE_FILES:  # pinned to the commit the listing came from
        url = hf_hub_url(source.location, name, revision=info.sha, endpoint=endpoint)
        with session.stream("GET", url, headers=headers, follow_redirects=True) as response:
            response.raise_for_status()
            budget.copy(response.iter_bytes(1 << 20), target / name)


def _fetch_fsspec(source: Source, target: Path, max_bytes: int) -> None:
    import fsspec

    # A new client per fetch: fsspec's instance cache would keep the endpoint and credentials the
    # first fetch saw (AWS_ENDPOINT_URL or a key changed since).
    fs, root = fsspec.core.url_to_fs(source.location, skip_instance_cache=True)
    sizes = {}
    for name in PACKAGE_FILES:
        path = f"{root}/{name}"
        if not fs.exists(path):
            raise SourceError(f"{source} has no {name}")
        sizes[name] = fs.size(path)
    total = sum(sizes.values())
    if total > max_bytes:
        raise SourceError(f"{source} is {total} bytes, over MAX_ADAPTER_BYTES ({max_bytes})")
    budget = _Budget(source, max_bytes)
    for name in PACKAGE_FILES:
        with fs.open(f"{root}/{name}", "rb") as remote:
            budget.copy(iter(lambda: remote.read(1 << 20), b""), target / name)
