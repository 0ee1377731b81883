r"""PII masking: e-mail and IP addresses, phone numbers, Chinese resident IDs, bank cards.

Each kind is a regular expression; the number-shaped kinds are *validated*
before they are masked, which is what keeps years, prices and dates intact:

- Chinese resident ID: 17 digits + a check character (ISO 7064 MOD 11-2, the
  GB 11643 checksum) and a plausible birth date inside it.
- bank card: 13–19 digits (contiguous or in groups of four) passing the Luhn check.
- phone: mainland mobile numbers (1[3-9]x, 11 digits, optional +86), Chinese
  landlines (0xx-xxxxxxxx), and international / North-American numbers, which must
  carry separators (+1 (555) 123-4567, 555-123-4567) so that a bare run of digits
  is never taken for one.
- IP: dotted IPv4 with each part ≤ 255 (not inside a longer dotted number), full IPv6.

Boundaries are ASCII letters and digits, not `\w`: in Chinese text a number
follows a Chinese character directly (电话13812345678), and `\w` matches those.

A document with more than `max_hits` matches is dropped (reason "pii_too_many"):
a page that is mostly addresses is a directory, not prose.
"""

from __future__ import annotations

import re

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter

EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
CN_ID = re.compile(r"(?<![0-9A-Za-z])\d{6}(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx](?![0-9A-Za-z])")
CARD = re.compile(r"(?<![\d-])(?:\d{4}(?:[ -]\d{4}){2,3}(?:[ -]\d{1,3})?|\d{13,19})(?![\d-])")
PHONE = re.compile(
    r"(?<![0-9A-Za-z+])(?:(?:\+|00)86[ -]?)?1[3-9]\d[ -]?\d{4}[ -]?\d{4}(?!\d)"                     # CN mobile
    r"|(?<![0-9A-Za-z+])0\d{2,3}-\d{7,8}(?!\d)"                                                   # CN landline
    r"|(?<![0-9A-Za-z+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}(?!\d)"  # +1 (555) 123-4567
)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IP = re.compile(
    rf"(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\.?\d)"
    r"|(?<![:0-9A-Za-z])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![:0-9A-Za-z])"
)

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def valid_cn_id(s: str) -> bool:
    """GB 11643 check character of an 18-character resident ID."""
    total = sum(int(c) * w for c, w in zip(s[:17], _ID_WEIGHTS))
    return "10X98765432"[total % 11] == s[17].upper()


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, d in enumerate(reversed(digits)):
        x = int(d)
        if i % 2 == 1:
            x *= 2
            x -= 9 if x > 9 else 0
        total += x
    return total % 10 == 0


def _card(s: str) -> bool:
    digits = s.replace(" ", "").replace("-", "")
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


# kind -> (pattern, validator or None); applied in this order, so an ID number is
# masked as an ID before the card rule sees its digits
KINDS = {
    "email": (EMAIL, None),
    "cn_id": (CN_ID, valid_cn_id),
    "bank_card": (CARD, _card),
    "phone": (PHONE, None),
    "ip": (IP, None),
}


class PIIMasker(BaseFilter):
    name = "🕵 PII"

    def __init__(self, kinds: dict[str, str], max_hits: int = 10, exclusion_writer=None):
        """kinds: {kind: replacement} for the kinds to mask (keys of KINDS)."""
        super().__init__(exclusion_writer)
        self.kinds = dict(kinds)
        self.max_hits = max_hits

    def mask(self, text: str) -> tuple[str, dict[str, int]]:
        hits: dict[str, int] = {}
        for kind, replacement in self.kinds.items():
            pattern, valid = KINDS[kind]

            def sub(m, kind=kind, replacement=replacement, valid=valid):
                if valid is not None and not valid(m.group()):
                    return m.group()
                hits[kind] = hits.get(kind, 0) + 1
                return replacement

            text = pattern.sub(sub, text)
        return text, hits

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        doc.text, hits = self.mask(doc.text)
        n = sum(hits.values())
        for kind, k in hits.items():
            self.stat_update(f"masked_{kind}", value=k)
        if n:
            doc.metadata["pii_masked"] = n
        if n > self.max_hits:
            return False, "pii_too_many"
        return True
