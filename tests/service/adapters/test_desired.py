"""RELEASES_FILE: what a reading accepts (errors name the field), and the plan from what a
replica serves to what the file declares."""

from __future__ import annotations

import pytest

from service.adapters.desired import CanarySpec, Release, ReleasesError, Serving, Step, plan, read

V1, V2, V3 = "s3://adapters/dolly/v1", "s3://adapters/dolly/v2", "s3://adapters/dolly/v3"


def write(tmp_path, text: str):
    path = tmp_path / "releases.yaml"
    path.write_text(text)
    return path


def test_a_reading_gives_each_name_its_sources_in_the_registrys_form(tmp_path):
    path = write(
        tmp_path,
        f"""
releases:
  dolly:
    stable: {V1}/
    canary: {{source: {V2}, traffic: 0.1}}
  schema:
    stable: hf://org/schema@v3
  local:
    stable: {tmp_path}/./pkg
""",
    )
    declared = read(path)
    assert declared.releases == {
        "dolly": Release(V1, CanarySpec(V2, 0.1)),  # the trailing slash is gone, as the registry records it
        "schema": Release("hf://org/schema@v3"),
        "local": Release(str(tmp_path / "pkg")),
    }
    assert read(path).digest == declared.digest
    path.write_text(path.read_text().replace("0.1", "0.2"))
    assert read(path).digest != declared.digest


def test_an_empty_file_declares_nothing(tmp_path):
    assert read(write(tmp_path, "")).releases == {}
    assert read(write(tmp_path, "releases: {}\n")).releases == {}


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("dolly: {stable: s3://b/v1}", "a mapping 'releases'"),
        ("releases: [dolly]", "a mapping 'releases'"),
        ("releases: {dolly: {canary: {source: s3://b/v2, traffic: 0.1}}}", "releases.dolly: a mapping with 'stable'"),
        ("releases: {dolly: {stable: s3://b/v1, traffc: 0.1}}", "releases.dolly: unknown fields ['traffc']"),
        ("releases: {dolly: {stable: ftp://b/v1}}", "releases.dolly.stable: unsupported source scheme"),
        ("releases: {dolly: {stable: 3}}", "releases.dolly.stable: a source"),
        ("releases: {dolly: {stable: s3://b/v1, canary: s3://b/v2}}", "releases.dolly.canary: a mapping of"),
        ("releases: {dolly: {stable: s3://b/v1, canary: {source: s3://b/v2}}}", "releases.dolly.canary: a mapping"),
        ("releases: {dolly: {stable: s3://b/v1, canary: {source: s3://b/v2, traffic: 1}}}", "canary.traffic"),
        ("releases: {dolly: {stable: s3://b/v1, canary: {source: s3://b/v2, traffic: 0}}}", "canary.traffic"),
        ("releases: {dolly: {stable: s3://b/v1, canary: {source: s3://b/v2, traffic: 'a'}}}", "canary.traffic"),
        ("releases: {dolly: {stable: s3://b/v1, canary: {source: s3://b/v2, traffic: true}}}", "canary.traffic"),
        ("releases: {dolly: {stable: s3://b/v1, canary: {source: 's3://b/v1/', traffic: 0.1}}}", "is the stable"),
        ("releases: {'../x': {stable: s3://b/v1}}", "releases.../x: an adapter name"),
        ("releases: {dolly: {stable: s3://b/v1}", "RELEASES_FILE"),  # not YAML
    ],
)
def test_a_wrong_file_is_refused_naming_the_field(tmp_path, text, field):
    with pytest.raises(ReleasesError) as info:
        read(write(tmp_path, text))
    assert field in str(info.value) and "RELEASES_FILE" in str(info.value)


def test_a_missing_file_is_refused(tmp_path):
    with pytest.raises(ReleasesError, match="RELEASES_FILE"):
        read(tmp_path / "absent.yaml")


def test_what_is_served_already_takes_no_step():
    releases = {"dolly": Release(V1, CanarySpec(V2, 0.1))}
    assert plan(releases, {"dolly": Serving(V1, V2, 0.1)}) == []


@pytest.mark.parametrize(
    ("want", "have", "steps"),
    [
        # not served yet: its stable version, then its canary
        (Release(V1, CanarySpec(V2, 0.1)), Serving(), [Step("stable", "d", V1), Step("canary", "d", V2, 0.1)]),
        # a canary added, widened, dropped
        (Release(V1, CanarySpec(V2, 0.1)), Serving(V1), [Step("canary", "d", V2, 0.1)]),
        (Release(V1, CanarySpec(V2, 0.5)), Serving(V1, V2, 0.1), [Step("traffic", "d", traffic=0.5)]),
        (Release(V1), Serving(V1, V2, 0.1), [Step("drop", "d")]),
        # the canary's source moved to stable: a promotion, not a second download
        (Release(V2), Serving(V1, V2, 0.5), [Step("promote", "d")]),
        # promoted, and the next canary already declared
        (Release(V2, CanarySpec(V3, 0.1)), Serving(V1, V2, 0.5), [Step("promote", "d"), Step("canary", "d", V3, 0.1)]),
        # the canary replaced by another
        (Release(V1, CanarySpec(V3, 0.1)), Serving(V1, V2, 0.1), [Step("canary", "d", V3, 0.1)]),
        # the old stable source back (a rollback by edit): a new stable version drops the canary,
        # so a canary that stays declared is loaded again after it
        (Release(V1), Serving(V2), [Step("stable", "d", V1)]),
        (
            Release(V3, CanarySpec(V2, 0.1)),
            Serving(V1, V2, 0.1),
            [Step("stable", "d", V3), Step("canary", "d", V2, 0.1)],
        ),
    ],
)
def test_the_plan_takes_the_fewest_steps_to_the_declared_release(want, have, steps):
    assert plan({"d": want}, {"d": have}) == steps


def test_names_the_file_does_not_list_are_left_alone():
    assert plan({}, {"dolly": Serving(V1, V2, 0.1)}) == []
