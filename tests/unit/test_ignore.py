"""Tests for syncmesh_plugin.ignore.IgnoreMatcher (gitignore semantics)."""

from __future__ import annotations

import pytest

from syncmesh_plugin.ignore import IgnoreMatcher


def ignored(patterns: list[str], path: str, is_dir: bool = False) -> bool:
    return IgnoreMatcher(patterns).ignored(path, is_dir)


def test_no_patterns_ignores_nothing() -> None:
    m = IgnoreMatcher([])
    assert not m
    assert not m.ignored("anything")
    assert not m.ignored("a/b/c", is_dir=True)


def test_comments_and_blank_lines_are_not_rules() -> None:
    m = IgnoreMatcher(["", "   ", "# *.lock", "/", "!"])
    assert not m
    assert not m.ignored("x.lock")
    assert m.patterns == ["", "   ", "# *.lock", "/", "!"]


@pytest.mark.parametrize(("path", "expected"), [
    ("x.lock", True), ("a/x.lock", True), ("a/b/c/x.lock", True), (".lock", True),
    ("x.lock.bak", False), ("x_lock", False), ("lock", False), ("a.lock/b", True),
])
def test_star_suffix_matches_at_any_depth(path: str, expected: bool) -> None:
    assert ignored(["*.lock"], path) is expected


def test_star_does_not_cross_slash_in_anchored_pattern() -> None:
    pats = ["doc/*.txt"]
    assert ignored(pats, "doc/a.txt")
    assert not ignored(pats, "doc/sub/a.txt")
    assert not ignored(pats, "x/doc/a.txt")


@pytest.mark.parametrize(("path", "is_dir", "expected"), [
    ("build", False, True), ("build", True, True), ("build/out.o", False, True), ("build/x/y", False, True),
    ("src/build", False, False), ("src/build", True, False), ("src/build/out.o", False, False),
    ("builder", True, False),
])
def test_leading_slash_anchors_to_root(path: str, is_dir: bool, expected: bool) -> None:
    assert ignored(["/build"], path, is_dir) is expected


@pytest.mark.parametrize(("path", "is_dir", "expected"), [
    ("cache", True, True),
    ("cache", False, False),  # a file named cache is not a directory
    ("cache/x", False, True),
    ("cache/sub/deep.bin", False, True),
    ("cache/sub", True, True),
    ("a/cache", True, True),  # no inner slash: any depth
    ("a/cache/x", False, True),
    ("a/cache", False, False),
    ("cachex/y", False, False),
    ("mycache/y", False, False),
])
def test_trailing_slash_is_directory_only(path: str, is_dir: bool, expected: bool) -> None:
    assert ignored(["cache/"], path, is_dir) is expected


@pytest.mark.parametrize(("path", "is_dir", "expected"), [
    ("tmp/x", False, True), ("a/tmp/x", False, True), ("a/b/tmp/c/d", False, True),
    ("tmp", True, False),  # `tmp/**` matches what is inside tmp, not tmp itself
    ("tmpx/y", False, False), ("a/xtmp/y", False, False), ("tmp", False, False),
])
def test_double_star_both_sides(path: str, is_dir: bool, expected: bool) -> None:
    assert ignored(["**/tmp/**"], path, is_dir) is expected


def test_double_star_in_the_middle() -> None:
    pats = ["a/**/b"]
    assert ignored(pats, "a/b")
    assert ignored(pats, "a/x/b")
    assert ignored(pats, "a/x/y/b")
    assert not ignored(pats, "x/a/b")
    assert not ignored(pats, "a/xb")


def test_leading_double_star() -> None:
    assert ignored(["**/foo"], "foo")
    assert ignored(["**/foo"], "x/y/foo")
    assert not ignored(["**/foo"], "x/foobar")


@pytest.mark.parametrize(("path", "expected"), [
    ("x.lock", True), ("keep.lock", False), ("a/keep.lock", False), ("a/other.lock", True), ("keep.lockx", False),
])
def test_negation_after_pattern(path: str, expected: bool) -> None:
    assert ignored(["*.lock", "!keep.lock"], path) is expected


def test_last_matching_pattern_wins() -> None:
    assert ignored(["!keep.lock", "*.lock"], "keep.lock")  # negation first, then re-excluded


def test_negation_cannot_reinclude_inside_ignored_dir() -> None:
    pats = ["cache/", "!cache/keep.txt"]
    assert ignored(pats, "cache/keep.txt")


@pytest.mark.parametrize(("path", "expected"), [
    ("file1.txt", True), ("fileA.txt", True), ("file.txt", False), ("file12.txt", False), ("d/file9.txt", True),
    ("file/.txt", False),
])
def test_question_mark(path: str, expected: bool) -> None:
    assert ignored(["file?.txt"], path) is expected


@pytest.mark.parametrize(("path", "expected"), [
    ("a.log", True), ("b.log", True), ("c.log", True), ("d.log", False), ("ab.log", False), ("x/b.log", True),
])
def test_character_class(path: str, expected: bool) -> None:
    assert ignored(["[abc].log"], path) is expected


def test_negated_character_class_and_range() -> None:
    assert ignored(["[!abc].log"], "d.log")
    assert not ignored(["[!abc].log"], "a.log")
    assert ignored(["v[0-9]"], "v7")
    assert not ignored(["v[0-9]"], "vx")


def test_unclosed_bracket_is_literal() -> None:
    assert ignored(["a[b"], "a[b")
    assert not ignored(["a[b"], "ab")


def test_regex_metacharacters_are_literal() -> None:
    assert ignored(["a+b.(x)"], "a+b.(x)")
    assert not ignored(["a+b.(x)"], "aab.(x)")
    assert not ignored(["a.b"], "axb")


@pytest.mark.parametrize(("path", "expected"), [
    ("node_modules", True), ("node_modules/x/y/z.js", True), ("pkg/node_modules/lib/a.js", True),
    ("node_modules_backup/a", False),
])
def test_parent_dir_ignore_implies_children(path: str, expected: bool) -> None:
    assert ignored(["node_modules"], path) is expected


def test_whitespace_around_patterns_is_stripped() -> None:
    assert ignored(["  *.lock  "], "a.lock")


def test_multiple_patterns() -> None:
    m = IgnoreMatcher(["*.lock", "/build", "cache/", "**/tmp/**", "!keep.lock"])
    assert m
    assert m.ignored("db.lock")
    assert not m.ignored("sub/keep.lock")
    assert m.ignored("build/a")
    assert not m.ignored("src/build/a")
    assert m.ignored("x/cache/y")
    assert m.ignored("x/tmp/y")
    assert not m.ignored("src/main.py")
