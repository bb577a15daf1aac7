"""`--publish DEST` uploads: the package lands where the service reads adapters from, through the
same libraries, and loads there as the same version (training.publish.upload). The evaluation
record and the whole CLI run are covered end to end by tests/test_release.py."""

from __future__ import annotations

import json
import shutil

import pytest

from service.adapters.registry import AdapterRegistry
from service.adapters.sources import PACKAGE_FILES, SourceError, content_version
from tests.servers import gcs_server, hub_server, s3_server
from training.publish import marketmail_rates, upload
from training.recipes import MARKETMAIL_SCHEMA

BUCKET = "published"


def registry(tiny, tmp_path, prefix):
    return AdapterRegistry(
        tmp_path / "adapters",
        base_id="tiny",
        base_fingerprint=tiny.fingerprint,
        download_dir=tmp_path / "downloads",
        allowed_sources=[prefix],
    )


@pytest.fixture
def package(tiny, tmp_path):
    out = tmp_path / "runs" / "alpha"
    shutil.copytree(tiny.adapter_dir / "alpha", out)
    (out / "training_log.json").write_text("[]")  # not a package file: never uploaded
    return out


def test_publish_to_a_directory_copies_the_package_files_only(tiny, tmp_path, package):
    dest = tmp_path / "shelf" / "alpha-v1"
    assert upload(package, str(dest)) == str(dest)
    assert sorted(p.name for p in dest.iterdir()) == sorted(PACKAGE_FILES)
    assert content_version(dest) == content_version(package)
    assert upload(package, str(package)) == str(package)  # publishing in place changes nothing


def test_publish_to_the_hub_creates_the_repo_and_loads_back(tiny, tmp_path, package, monkeypatch):
    with hub_server(tmp_path / "hub") as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        assert upload(package, "hf://team/alpha") == "hf://team/alpha"
        upload(package, "hf://team/alpha")  # the repo exists now: a new commit, same files
        record = registry(tiny, tmp_path, "hf://team/").register("alpha", "hf://team/alpha")
    assert record.version == content_version(package)
    assert sorted(p.name for p in (tmp_path / "hub" / "team" / "alpha" / "main").iterdir()) == sorted(PACKAGE_FILES)


def test_publish_to_s3_and_gcs_loads_back_as_the_same_version(tiny, tmp_path, package):
    with s3_server():
        upload(package, f"s3://{BUCKET}/team/alpha/v1")  # the bucket is created on the way
        record = registry(tiny, tmp_path / "s3", f"s3://{BUCKET}/team/").register(
            "alpha", f"s3://{BUCKET}/team/alpha/v1"
        )
        assert record.version == content_version(package)
    with gcs_server(BUCKET):
        upload(package, f"gs://{BUCKET}/team/alpha/v1")
        record = registry(tiny, tmp_path / "gs", f"gs://{BUCKET}/team/").register(
            "alpha", f"gs://{BUCKET}/team/alpha/v1"
        )
        assert record.version == content_version(package)


def test_a_destination_that_is_no_source_is_refused(package):
    with pytest.raises(SourceError, match="unsupported source scheme"):
        upload(package, "ftp://host/alpha")


def test_marketmail_rates_tell_valid_from_named():
    held = [{"product": "Lamp"}] * 4
    outputs = [
        '{"subject": "Lamp sale", "body": "b", "call_to_action": "Buy"}',  # valid and named
        '{"subject": "Sale", "body": "b", "call_to_action": "Buy"}',  # valid, not named
        '{"subject": "Lamp"}',  # not of the schema
        "not JSON",
    ]
    assert marketmail_rates(outputs, held, MARKETMAIL_SCHEMA) == {"valid_rate": 0.5, "named_rate": 0.25}


def test_a_published_package_is_a_warm_start_for_the_next_run(tiny, tmp_path, package, cache_dir):
    """--init-adapter s3://...: fetched through the service's source code, checked for this base."""
    from service.base_model import resolve_source
    from training.config import LoraSettings
    from training.model import init_adapter

    with s3_server():
        upload(package, f"s3://{BUCKET}/team/alpha/v1")
        path, shape = init_adapter(
            f"s3://{BUCKET}/team/alpha/v1", resolve_source(str(tiny.base_dir), cache_dir), LoraSettings(), tmp_path
        )
    assert content_version(path) == content_version(package)
    peft = json.loads((package / "adapter_config.json").read_text())
    assert (shape.r, shape.alpha) == (peft["r"], peft["lora_alpha"])
