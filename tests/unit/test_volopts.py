"""Tests for syncmesh_plugin.volopts: volume names and per-volume options."""

from __future__ import annotations

from typing import Any

import pytest

from syncmesh_plugin.volopts import OPTION_HELP, VolumeError, VolumeOptions, parse_options, validate_name

# ---- validate_name


@pytest.mark.parametrize("name", ["a", "data", "my_vol-1.2", "0abc", "A", "a" * 255, "x.", "a--b__c..d"])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["../x", "a/b", "-x", "_x", ".x", "..", ".", "a b", "a\x00b", "vol\n", "é",
                                  "a:b", "a" * 256])
def test_invalid_names(name: str) -> None:
    with pytest.raises(VolumeError) as ei:
        validate_name(name)
    assert str(ei.value).startswith("invalid volume name ")
    assert "[a-zA-Z0-9][a-zA-Z0-9_.-]*" in str(ei.value)


def test_name_limit_is_in_bytes() -> None:
    validate_name("a" * 255)
    with pytest.raises(VolumeError, match="at most 255 bytes"):
        validate_name("a" * 256)


@pytest.mark.parametrize("name", ["", None, 123, b"vol", ["vol"], {"Name": "vol"}, True])
def test_missing_or_non_string_name(name: Any) -> None:
    with pytest.raises(VolumeError, match=r"^missing volume name: "):
        validate_name(name)


def test_volume_error_is_a_value_error() -> None:
    assert issubclass(VolumeError, ValueError)


# ---- parse_options


def test_none_means_defaults() -> None:
    opts = parse_options(None)
    assert opts == VolumeOptions()
    assert opts.conflict_resolution is None
    assert opts.keep_conflict_copies is True
    assert opts.compression is True
    assert opts.ignore == ()
    assert opts.mount_timeout is None


def test_empty_mapping_means_defaults() -> None:
    assert parse_options({}) == VolumeOptions()


@pytest.mark.parametrize("mode", ["timestamp", "size", "manual"])
def test_conflict_resolution_valid(mode: str) -> None:
    assert parse_options({"conflict_resolution": mode}).conflict_resolution == mode


@pytest.mark.parametrize("mode", ["newest", "", "Timestamp", "size "])
def test_conflict_resolution_invalid(mode: str) -> None:
    with pytest.raises(VolumeError) as ei:
        parse_options({"conflict_resolution": mode})
    msg = str(ei.value)
    assert msg.startswith(f"bad value {mode!r} for volume option conflict_resolution: expected timestamp|size|manual")
    assert "valid options:" in msg


@pytest.mark.parametrize("key", ["keep_conflict_copies", "compression"])
@pytest.mark.parametrize(("text", "value"), [("true", True), ("1", True), ("yes", True), ("on", True),
                                             ("false", False), ("0", False), ("no", False), ("OFF", False)])
def test_boolean_options_valid(key: str, text: str, value: bool) -> None:
    assert getattr(parse_options({key: text}), key) is value


@pytest.mark.parametrize("key", ["keep_conflict_copies", "compression"])
@pytest.mark.parametrize("text", ["maybe", "", "2", "tru"])
def test_boolean_options_invalid(key: str, text: str) -> None:
    with pytest.raises(VolumeError, match=rf"^bad value {text!r} for volume option {key}: expected true\|false"):
        parse_options({key: text})


def test_non_string_values_are_stringified() -> None:
    # compose can hand over YAML booleans and numbers in driver_opts
    opts = parse_options({"compression": False, "mount_timeout": 30})
    assert opts.compression is False
    assert opts.mount_timeout == 30.0


@pytest.mark.parametrize(("text", "seconds"), [("60s", 60.0), ("1m", 60.0), ("110s", 110.0), ("15", 15.0),
                                               ("1s", 1.0), ("1500ms", 1.5)])
def test_mount_timeout_valid(text: str, seconds: float) -> None:
    opts = parse_options({"mount_timeout": text})
    assert opts.mount_timeout == pytest.approx(seconds)
    assert type(opts.mount_timeout) is float  # plain float, safe to store as JSON


# dockerd cuts a plugin's Mount at 120 s: a wait that long would fail in Docker, not here with a reason.
@pytest.mark.parametrize("text", ["soon", "-1s", "10 days", "", "1e3", "500ms", "0", "2m", "1h"])
def test_mount_timeout_invalid(text: str) -> None:
    with pytest.raises(VolumeError, match=r"for volume option mount_timeout: expected duration such as 25s, at most "
                                          r"110s"):
        parse_options({"mount_timeout": text})


def test_unknown_option_lists_valid_ones() -> None:
    with pytest.raises(VolumeError) as ei:
        parse_options({"compresion": "true"})
    msg = str(ei.value)
    assert msg.startswith("unknown volume option 'compresion'; valid options: ")
    for key in OPTION_HELP:
        assert f"{key}=" in msg


@pytest.mark.parametrize("opts", [["compression=true"], "compression=true", 5, True])
def test_opts_not_a_mapping(opts: Any) -> None:
    with pytest.raises(VolumeError, match=r"^Opts must be an object of string values; valid options: "):
        parse_options(opts)


def test_ignore_parsing() -> None:
    opts = parse_options({"ignore": " *.lock , cache/,,**/tmp/** ,"})
    assert opts.ignore == ("*.lock", "cache/", "**/tmp/**")


def test_ignore_empty_is_no_patterns() -> None:
    assert parse_options({"ignore": " , ,"}).ignore == ()


def test_ignore_rejects_nul_and_huge_patterns() -> None:
    with pytest.raises(VolumeError, match="for volume option ignore"):
        parse_options({"ignore": "ok,a\x00b"})
    with pytest.raises(VolumeError, match="for volume option ignore"):
        parse_options({"ignore": "x" * 1025})
    assert parse_options({"ignore": "x" * 1024}).ignore == ("x" * 1024,)


def test_all_options_together() -> None:
    opts = parse_options({"conflict_resolution": "size", "keep_conflict_copies": "false", "compression": "no",
                          "ignore": "*.tmp", "mount_timeout": "5s"})
    assert opts == VolumeOptions(conflict_resolution="size", keep_conflict_copies=False, compression=False,
                                 ignore=("*.tmp",), mount_timeout=5.0)


# ---- JSON form stored in etcd


def test_to_json_drops_unset_and_from_json_round_trips() -> None:
    assert VolumeOptions().to_json() == {"keep_conflict_copies": True, "compression": True, "ignore": []}
    opts = parse_options({"conflict_resolution": "manual", "ignore": "a,b", "mount_timeout": "2s"})
    js = opts.to_json()
    assert js == {"conflict_resolution": "manual", "keep_conflict_copies": True, "compression": True,
                  "ignore": ["a", "b"], "mount_timeout": 2.0}
    assert VolumeOptions.from_json(js) == opts


def test_from_json_empty_is_defaults() -> None:
    assert VolumeOptions.from_json({}) == VolumeOptions()


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("false", False), (True, True), ("yes", True)])
def test_mount_partial(value: object, expected: bool) -> None:
    opts = parse_options({"mount_partial": value})
    assert opts.mount_partial is expected
    assert VolumeOptions.from_json(opts.to_json()).mount_partial is expected
