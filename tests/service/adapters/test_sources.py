"""Adapter sources over their real protocols: a local hub endpoint, a local S3 server (moto),
local paths; allowlists, size limits, versions, and atomic installs."""

from __future__ import annotations

import json
import shutil

import pytest

from service.adapters.registry import AdapterExists, AdapterRegistry, AdapterRejected
from service.adapters.sources import PACKAGE_FILES, SourceError, allowed, parse_source
from tests.servers import gcs_server, hub_server, s3_server

BUCKET = "hotswap-adapters"


@pytest.mark.parametrize(
    ("spec", "kind", "location", "revision"),
    [
        ("/srv/adapters/x", "local", "/srv/adapters/x", None),
        ("hf://org/repo", "hub", "org/repo", None),
        ("hf://org/repo@v2", "hub", "org/repo", "v2"),
        ("org/repo@0123abcd", "hub", "org/repo", "0123abcd"),  # vLLM takes a bare hub id
        ("s3://bucket/team/x/", "fsspec", "s3://bucket/team/x", None),
        ("gs://bucket/x", "fsspec", "gs://bucket/x", None),
    ],
)
def test_sources_are_parsed(spec, kind, location, revision):
    source = parse_source(spec)
    assert (source.kind, source.location, source.revision) == (kind, location, revision)


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "ftp://host/x",
        "not a repo",
        "hf://../x",
        "s3://bucket/../x",
        "simplecache::s3://bucket/x",  # review M6: fsspec chains
        "s3://bucket/x?versionId=1",
        "hf://org/x#frag",
        "s3://bucket/a b",
    ],
)
def test_malformed_sources_are_refused(spec):
    with pytest.raises(SourceError):
        parse_source(spec)


def test_the_allowlist_matches_whole_path_components(tmp_path):
    adapters = tmp_path / "adapters"
    prefixes = ["s3://bucket/team", "hf://org/", str(tmp_path / "extra")]
    assert allowed(parse_source("s3://bucket/team/x"), prefixes, adapters)
    assert not allowed(parse_source("s3://bucket/team-x/y"), prefixes, adapters)
    assert allowed(parse_source("hf://org/repo@v1"), prefixes, adapters)
    assert not allowed(parse_source("hf://organisation/repo"), prefixes, adapters)
    assert allowed(parse_source(str(adapters / "a")), [], adapters)
    assert allowed(parse_source(str(tmp_path / "extra" / "b")), prefixes, adapters)
    assert not allowed(parse_source(str(tmp_path / "elsewhere")), prefixes, adapters)
    assert not allowed(parse_source(str(adapters / ".." / "elsewhere")), [], adapters)


def registry(tiny, tmp_path, **kwargs) -> AdapterRegistry:
    reg = AdapterRegistry(
        tmp_path / "adapters",
        base_id="tiny",
        base_fingerprint=tiny.fingerprint,
        download_dir=tmp_path / "downloads",
        **kwargs,
    )
    reg.scan()
    return reg


def files(package) -> dict[str, bytes]:
    return {name: (package / name).read_bytes() for name in PACKAGE_FILES}


def test_hub_repos_load_at_a_revision_into_the_cache_atomically(tiny, tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    shutil.copytree(tiny.adapter_dir / "alpha", hub / "org" / "alpha" / "v1")
    shutil.copytree(tiny.adapter_dir / "beta", hub / "org" / "alpha" / "v2")  # retrained: new weights
    manifest = json.loads((hub / "org/alpha/v2/hotswap.json").read_text())
    (hub / "org/alpha/v2/hotswap.json").write_text(json.dumps({**manifest, "name": "alpha"}))
    (hub / "org/alpha/v2/notes.bin").write_bytes(b"never fetched: not a package file")
    reg = registry(tiny, tmp_path, allowed_sources=["hf://org/"])
    with hub_server(hub) as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        first = reg.register("alpha", "hf://org/alpha@v1")
        with pytest.raises(AdapterExists, match="load_inplace"):
            reg.register("alpha", "hf://org/alpha@v2")
        second = reg.register("alpha", "org/alpha@v2", replace=True)
    assert first.version != second.version and reg.get("alpha") is second
    assert files(second.path) == files(hub / "org/alpha/v2")
    assert sorted(p.name for p in second.path.iterdir()) == sorted(PACKAGE_FILES)
    assert second.path.parent == tmp_path / "downloads" / "alpha"
    assert not [p for p in (tmp_path / "downloads").iterdir() if p.name.startswith(".staging")]
    assert reg.version(first.key) is first  # the old version stays known for running requests
    assert second.source == "hf://org/alpha@v2" and second.origin == "api"


def test_a_hub_package_for_another_base_is_refused_and_changes_nothing(tiny, tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    shutil.copytree(tiny.adapter_dir / "alpha", hub / "org" / "alpha" / "main")
    doc = json.loads((hub / "org/alpha/main/hotswap.json").read_text())
    doc["base_model"]["fingerprint"] = "hsfp1:" + "0" * 64
    (hub / "org/alpha/main/hotswap.json").write_text(json.dumps(doc))
    reg = registry(tiny, tmp_path, allowed_sources=["hf://org"])
    with hub_server(hub) as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        with pytest.raises(AdapterRejected, match="fingerprint"):
            reg.register("gamma", "hf://org/alpha")
        with pytest.raises(SourceError, match="cannot fetch"):
            reg.register("gamma", "hf://org/missing")
    assert "gamma" not in reg and list((tmp_path / "downloads").iterdir()) == []


def test_s3_packages_load_and_the_limits_hold(tiny, tmp_path):
    import boto3

    with s3_server():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket=BUCKET)
        for name in PACKAGE_FILES:
            s3.upload_file(str(tiny.adapter_dir / "beta" / name), BUCKET, f"team/beta/{name}")
        s3.upload_file(str(tiny.adapter_dir / "beta" / PACKAGE_FILES[0]), BUCKET, f"team/broken/{PACKAGE_FILES[0]}")
        reg = registry(tiny, tmp_path, allowed_sources=[f"s3://{BUCKET}/team/"])
        record = reg.register("beta", f"s3://{BUCKET}/team/beta")
        assert files(record.path) == files(tiny.adapter_dir / "beta")
        assert record.version == reg.get("beta").version
        with pytest.raises(SourceError, match="has no adapter_model.safetensors"):
            reg.register("broken", f"s3://{BUCKET}/team/broken")
        with pytest.raises(SourceError, match="not an allowed adapter source"):
            reg.register("other", f"s3://{BUCKET}/elsewhere/beta")
        small = registry(tiny, tmp_path / "small", allowed_sources=[f"s3://{BUCKET}/"], max_bytes=1024)
        with pytest.raises(SourceError, match="MAX_ADAPTER_BYTES"):
            small.register("beta", f"s3://{BUCKET}/team/beta")  # refused before the download
        assert not (tmp_path / "small" / "downloads").exists() or not any((tmp_path / "small" / "downloads").iterdir())


def test_gcs_packages_load(tiny, tmp_path):
    import fsspec

    with gcs_server(BUCKET):
        fs, root = fsspec.core.url_to_fs(f"gs://{BUCKET}/team/alpha")
        for name in PACKAGE_FILES:
            fs.put_file(str(tiny.adapter_dir / "alpha" / name), f"{root}/{name}")
        reg = registry(tiny, tmp_path, allowed_sources=[f"gs://{BUCKET}/team"])
        record = reg.register("alpha-gcs", f"gs://{BUCKET}/team/alpha")
    assert files(record.path) == files(tiny.adapter_dir / "alpha") and record.source == f"gs://{BUCKET}/team/alpha"


def test_local_paths_load_in_place_and_only_when_allowed(tiny, tmp_path):
    reg = registry(tiny, tmp_path, allowed_sources=[str(tmp_path / "shelf")])
    shutil.copytree(tiny.adapter_dir / "alpha", tmp_path / "shelf" / "a1")
    shutil.copytree(tiny.adapter_dir / "alpha", tmp_path / "elsewhere" / "a1")
    record = reg.register("renamed", str(tmp_path / "shelf" / "a1"))  # another name than the manifest's
    assert record.path == tmp_path / "shelf" / "a1" and reg.get("renamed") is record
    with pytest.raises(SourceError, match="not an allowed"):
        reg.register("other", str(tmp_path / "elsewhere" / "a1"))
    with pytest.raises(ValueError, match="invalid adapter name"):
        reg.register("../x", str(tmp_path / "shelf" / "a1"))
    assert reg.unregister("renamed") is record and "renamed" not in reg


def test_pull_request_revisions_need_a_prefix_that_names_them(tmp_path):
    """Security review M6: `hf://org/repo@refs/pr/N` is anyone's upload to the repo, and it
    passed an `hf://org/` allowlist."""
    from service.adapters.sources import allowed

    pr = parse_source("hf://org/alpha@refs/pr/3")
    assert not allowed(pr, ["hf://org/", "hf://org/alpha"], tmp_path)
    assert allowed(pr, ["hf://org/alpha@refs/pr/3"], tmp_path)
    assert allowed(parse_source("hf://org/alpha@v2"), ["hf://org/"], tmp_path)


def test_the_size_limit_holds_on_the_bytes_not_the_listing(tiny, tmp_path, monkeypatch):
    """Security review M6: a hub listing that under-reports sizes got a package past
    MAX_ADAPTER_BYTES; the bytes are counted as they arrive, and nothing is kept."""
    from huggingface_hub import HfApi

    hub = tmp_path / "hub"
    shutil.copytree(tiny.adapter_dir / "alpha", hub / "org" / "alpha" / "main")
    real = HfApi.model_info

    def under_reported(self, *args, **kwargs):
        info = real(self, *args, **kwargs)
        for sibling in info.siblings or []:
            sibling.size = 1
        return info

    monkeypatch.setattr(HfApi, "model_info", under_reported)
    reg = registry(tiny, tmp_path, allowed_sources=["hf://org/"], max_bytes=1024)
    with hub_server(hub) as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        with pytest.raises(SourceError, match="as it downloads"):
            reg.register("alpha", "hf://org/alpha")
    assert "alpha" not in reg and list((tmp_path / "downloads").iterdir()) == []


def test_staging_folders_a_dead_process_left_are_removed_at_start(tiny, tmp_path):
    stale = tmp_path / "downloads" / ".staging-0123"
    (stale / "part").mkdir(parents=True)
    registry(tiny, tmp_path)
    assert not stale.exists()
