"""Which byte-level tokens belong to a new language's script, the rule that keeps base-language text unchanged.

A byte-level token is a run of UTF-8 bytes, possibly cut inside a character. An appended merge can only fire
where its result's bytes occur in the text. So a merge whose result holds a whole character of the script
(Han for Chinese), or ends in the start of a character that every completion makes a script character (the
first two bytes of a CJK ideograph), fires only in text that holds the script: text without it encodes exactly
as under the base.
"""

from __future__ import annotations

import functools
import unicodedata

from ..errors import UserError


@functools.lru_cache(maxsize=None)
def byte_decoder() -> dict[str, int]:
    """ByteLevel's printable stand-in character -> byte (GPT-2's bytes_to_unicode, inverted)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(token: str) -> bytes | None:
    """The bytes of a ByteLevel token, or None when it is not one (a special token's text)."""
    dec = byte_decoder()
    try:
        return bytes(dec[c] for c in token)
    except KeyError:
        return None


def compile_script(script: str):
    """`--script`: a Unicode script name (Han, Hangul, Devanagari, ...) or a regex character class ([...])."""
    import regex

    pattern = script if script.startswith("[") or "\\p{" in script else rf"\p{{{script}}}"
    try:
        return regex.compile(pattern)
    except regex.error as exc:
        raise UserError(f"--script {script!r} is neither a Unicode script name (e.g. Han) nor a character class: {exc}") from None


def _char_len(lead: int) -> int:
    return 2 if 0xC2 <= lead <= 0xDF else 3 if 0xE0 <= lead <= 0xEF else 4 if 0xF0 <= lead <= 0xF4 else 0


class ScriptRule:
    """Decides whether a byte string can only occur in text that holds the script."""

    def __init__(self, script: str):
        self.script = script
        self.rx = compile_script(script)
        self._fragments: dict[bytes, bool] = {}

    def _fragment_in_script(self, frag: bytes) -> bool:
        """Whether every assigned character starting with these bytes (a lead byte and 0-2 continuations) is in the script."""
        if frag in self._fragments:
            return self._fragments[frag]
        need = _char_len(frag[0]) - len(frag)
        ok = need > 0 and all(0x80 <= b <= 0xBF for b in frag[1:])
        seen = False
        if ok:
            def completions(prefix: bytes, k: int):
                if k == 0:
                    yield prefix
                    return
                for c in range(0x80, 0xC0):
                    yield from completions(prefix + bytes([c]), k - 1)

            for full in completions(frag, need):
                try:
                    ch = full.decode("utf-8")
                except UnicodeDecodeError:
                    continue
                if unicodedata.category(ch) == "Cn":
                    continue
                seen = True
                if not self.rx.match(ch):
                    ok = False
                    break
        self._fragments[frag] = ok and seen
        return ok and seen

    def holds_script(self, b: bytes) -> bool:
        """True when the bytes hold a whole script character or end in a script-only character start."""
        i = 0
        while i < len(b) and 0x80 <= b[i] <= 0xBF:  # the tail of a character cut before this token
            i += 1
        text = b[i:].decode("utf-8", errors="ignore")
        if self.rx.search(text):
            return True
        # A character cut at the end: find the last lead byte.
        j = len(b) - 1
        while j >= i and 0x80 <= b[j] <= 0xBF:
            j -= 1
        if j >= i and _char_len(b[j]) > len(b) - j:
            return self._fragment_in_script(b[j:])
        return False

    def text_has_script(self, text: str) -> bool:
        return bool(self.rx.search(text))
