"""gitignore-style patterns for paths that are never synced (lock files, caches).

Supported: `*`, `?`, `[...]`, `**` (any number of directories), a leading `/` anchors to the volume
root, a pattern without `/` matches a name at any depth, a trailing `/` matches directories only (and
so everything below them), a leading `!` re-includes. The last matching pattern wins, as in git.
"""

from __future__ import annotations

import re
from collections.abc import Sequence


def _translate(glob: str) -> str:
    out = []
    i = 0
    while i < len(glob):
        c = glob[i]
        if glob.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if glob.startswith("/**", i) and i + 3 == len(glob):
            out.append("/.*")
            i += 3
            continue
        if glob.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = glob.find("]", i + 1)
            if j == -1:
                out.append(re.escape(c))
            else:
                body = glob[i + 1:j].replace("\\", "\\\\")
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


class IgnoreMatcher:
    """Decides whether a relative path (or any of its parent directories) is ignored."""

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = list(patterns)
        self._rules: list[tuple[re.Pattern[str], bool, bool]] = []  # (regex, negate, dir_only)
        for raw in patterns:
            pat = raw.strip()
            if not pat or pat.startswith("#"):
                continue
            negate = pat.startswith("!")
            if negate:
                pat = pat[1:]
            dir_only = pat.endswith("/")
            pat = pat.rstrip("/")
            if not pat:
                continue
            anchored = "/" in pat
            pat = pat.lstrip("/")
            rx = _translate(pat)
            rx = ("^" if anchored else "^(?:.*/)?") + rx + "$"
            self._rules.append((re.compile(rx), negate, dir_only))

    def __bool__(self) -> bool:
        return bool(self._rules)

    def _match_one(self, path: str, is_dir: bool) -> bool | None:
        result: bool | None = None
        for rx, negate, dir_only in self._rules:
            if dir_only and not is_dir:
                continue
            if rx.match(path):
                result = not negate
        return result

    def ignored(self, rel: str, is_dir: bool = False) -> bool:
        """True if `rel` or one of its parent directories is ignored."""
        if not self._rules:
            return False
        parts = rel.split("/")
        for i in range(1, len(parts)):
            if self._match_one("/".join(parts[:i]), True):
                return True
        return bool(self._match_one(rel, is_dir))
