"""Each benchmark owns one marked section of a docs page, so several benchmarks share docs/results.md and
docs/benchmarks.md without overwriting each other's tables."""

from __future__ import annotations

from pathlib import Path


def replace_section(page: Path, name: str, text: str) -> None:
    """Put `text` between `<!-- begin NAME -->` and `<!-- end NAME -->` on `page`, appending the section if new."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    old = page.read_text() if page.is_file() else ""
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        new = head + block + ("\n" + tail if tail else "")  # one blank line before the text that follows
    else:
        new = old + ("\n" if old and not old.endswith("\n\n") else "") + block
    page.write_text(new)
