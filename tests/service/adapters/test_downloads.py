"""The download cache shared by replicas (one `cache.persistence` volume for every pod): a
replica never deletes a version another one holds, nor a download another one is filling, and
a dead replica holds nothing. Two caches on one root are two replicas: flock locks conflict
between open files, within a process as between processes."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from service.adapters.downloads import DownloadCache
from service.adapters.registry import AdapterRegistry
from service.adapters.sources import SourceError
from tests.servers import hub_server


def staged(cache: DownloadCache, content: str):
    """Install a one-file 'package' whose version is its content, as the registry would."""
    with cache.staging() as staging:
        (staging / "adapter_config.json").write_text(content)
        return cache.install(staging, "alpha", content)


def versions(root) -> list[str]:
    folder = root / "alpha"
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


def test_a_replica_does_not_delete_a_version_another_holds(tmp_path):
    a, b = DownloadCache(tmp_path), DownloadCache(tmp_path)
    staged(a, "v1")
    staged(b, "v1")  # the same version downloaded again: the first install wins, both hold it
    staged(b, "v2")
    assert b.prune("alpha", keep={"v2"}) == ["v1"]
    assert versions(tmp_path) == ["v1", "v2"]  # a serves v1 still
    assert (tmp_path / "alpha" / "v1" / "adapter_config.json").read_text() == "v1"
    assert a.prune("alpha", keep={"v1"}) == ["v2"]
    assert versions(tmp_path) == ["v1", "v2"]  # b serves v2
    assert a.prune("alpha", keep=set()) == ["v1", "v2"]
    assert versions(tmp_path) == ["v2"]  # nobody held v1 any more
    assert not (tmp_path / "alpha" / ".v1.lock").exists()
    staged(a, "v1")  # a version deleted once installs again
    assert versions(tmp_path) == ["v1", "v2"] and a.held("alpha") == {"v1"}


def test_a_dead_replica_holds_nothing(tmp_path):
    holder = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from service.adapters.downloads import DownloadCache
        cache = DownloadCache(Path({str(tmp_path)!r}))
        with cache.staging() as staging:
            (staging / "adapter_config.json").write_text("v1")
            cache.install(staging, "alpha", "v1")
        print("held", flush=True)
        sys.stdin.read()
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "held\n"
        ours = DownloadCache(tmp_path)
        staged(ours, "v2")
        ours.prune("alpha", keep={"v2"})
        assert versions(tmp_path) == ["v1", "v2"]  # the other process is alive and holds v1
    finally:
        proc.send_signal(signal.SIGKILL)  # no cleanup runs: the kernel drops its locks
        proc.wait()
    ours.prune("alpha", keep={"v2"})
    assert versions(tmp_path) == ["v2"]


def test_a_start_sweeps_only_downloads_whose_process_is_gone(tmp_path):
    live = DownloadCache(tmp_path)
    orphan = tmp_path / ".staging-0123"
    (orphan / "part").mkdir(parents=True)
    (tmp_path / ".staging-4567.lock").touch()  # a lock whose downloader died before its folder
    with live.staging() as filling:
        (filling / "adapter_config.json").write_text("half")
        swept = DownloadCache(tmp_path).sweep()  # another replica starts meanwhile
        assert filling.is_dir() and (filling / "adapter_config.json").read_text() == "half"
        assert orphan in swept and not orphan.exists()
        assert not (tmp_path / ".staging-4567.lock").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the download left nothing behind


def _hub_versions(tiny, hub):
    """alpha@v1 to v4: four contents of one adapter in a hub repo."""
    for revision, package in (("v1", "alpha"), ("v2", "beta"), ("v3", "beta"), ("v4", "alpha")):
        target = hub / "org" / "alpha" / revision
        shutil.copytree(tiny.adapter_dir / package, target)
        manifest = json.loads((target / "hotswap.json").read_text())
        (target / "hotswap.json").write_text(json.dumps({**manifest, "name": "alpha", "description": revision}))


def replica(tiny, tmp_path) -> AdapterRegistry:
    """One replica's registry: no adapter directory, the download cache under tmp_path/cache."""
    reg = AdapterRegistry(
        tmp_path / "none",
        base_id="tiny",
        base_fingerprint=tiny.fingerprint,
        download_dir=tmp_path / "cache" / "adapters",
        allowed_sources=["hf://org/"],
    )
    reg.scan()
    return reg


def test_replicas_sharing_a_cache_keep_each_others_versions(tiny, tmp_path, monkeypatch):
    """Replica a serves v1; replica b moves v1 -> v2 -> v3 -> v4 and so lets go of v1 (a
    replica keeps the version it serves and the one a rollback returns to, and lets go of the
    others at its next download): the files a serves stay on disk, for its engine to reload
    after an eviction, until a lets go too."""
    _hub_versions(tiny, tmp_path / "hub")

    a, b = replica(tiny, tmp_path), replica(tiny, tmp_path)
    with hub_server(tmp_path / "hub") as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        served = a.register("alpha", "hf://org/alpha@v1")
        assert b.register("alpha", "hf://org/alpha@v1").path == served.path  # one download on disk
        v2 = b.register("alpha", "hf://org/alpha@v2", replace=True)
        v3 = b.register("alpha", "hf://org/alpha@v3", replace=True)
        v4 = b.register("alpha", "hf://org/alpha@v4", replace=True)  # b lets go of v1 here
        assert len({served.version, v2.version, v3.version, v4.version}) == 4
        assert served.path.is_dir()
        config, tensors = a.read_package("alpha")  # a still reads v1's package
        assert config and tensors
        for version in ("v2", "v3", "v4"):
            a.register("alpha", f"hf://org/alpha@{version}", replace=True)  # a lets go of v1 at v4
    assert not served.path.exists()
    on_disk = sorted(p.name for p in served.path.parent.iterdir() if not p.name.startswith("."))
    assert on_disk == sorted([v2.version, v3.version, v4.version])


def test_a_cache_that_cannot_store_the_package_is_a_clear_source_error(tiny, tmp_path, monkeypatch):
    _hub_versions(tiny, tmp_path / "hub")
    (tmp_path / "cache").write_text("a file where the cache directory should be")
    reg = replica(tiny, tmp_path)
    with hub_server(tmp_path / "hub") as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        with pytest.raises(SourceError, match="cannot store hf://org/alpha@v1 in the adapter cache"):
            reg.register("alpha", "hf://org/alpha@v1")
    assert "alpha" not in reg
