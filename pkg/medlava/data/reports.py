"""Radiology report sections by the rules of MIMIC-CXR's own section parser: a header is an upper-case
name followed by ':' at the start of a line; names are normalised (IMPRESSIONS, CONCLUSION -> impression;
FINDINGS AND IMPRESSION -> impression, as MIMIC's parser ranks impression first; titles such as
'CHEST, PA AND LATERAL:' -> findings); empty sections are dropped and repeated ones joined.

Hand-written because MIMIC's parser is a script in its code repository, not a package."""

from __future__ import annotations

import re

_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z0-9 ,&/()'-]*?)[ \t]*:", re.MULTILINE)
_ALIASES = {
    "impressions": "impression",
    "conclusion": "impression",
    "conclusions": "impression",
    "summary": "impression",
    "finding": "findings",
    "findings/impression": "impression",
}
_TITLE = re.compile(r"chest|portable|pa and lat|lateral and pa|ap and lat|frontal|two views|one view|ap view|pa view")


def section_name(header: str) -> str:
    name = " ".join(header.lower().split())
    if name in _ALIASES:
        return _ALIASES[name]
    for main in ("impression", "findings"):
        if main in name:
            return main
    return "findings" if _TITLE.search(name) else name


def sections(text: str) -> dict[str, str]:
    """Section name -> its text (whitespace collapsed); text before the first header is `preamble`."""
    found: dict[str, list[str]] = {}
    heads = list(_HEADER.finditer(text))
    bounds = [(None, 0, heads[0].start() if heads else len(text))]
    bounds += [
        (h.group(1), h.end(), heads[i + 1].start() if i + 1 < len(heads) else len(text)) for i, h in enumerate(heads)
    ]
    for header, start, end in bounds:
        body = " ".join(text[start:end].split())
        if body:
            found.setdefault("preamble" if header is None else section_name(header), []).append(body)
    return {name: " ".join(parts) for name, parts in found.items()}


def target_text(text: str, section: str) -> str:
    """The text a report-generation sample is trained on: findings, impression, or both ('' when absent)."""
    s = sections(text)
    if section == "findings_impression":
        return " ".join(p for p in (s.get("findings"), s.get("impression")) if p)
    return s.get(section, "")
