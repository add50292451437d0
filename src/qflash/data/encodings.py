"""Deciding the text encoding of a data file, and refusing to guess when the bytes do not say.

Per file (Parquet is UTF-8 by definition and never comes here):
  1. a byte-order mark decides (UTF-8, UTF-16, UTF-32);
  2. strict UTF-8;
  3. data.encoding, when set (not `auto`): the file is decoded with it, bytes it cannot decode are
     problems of their lines;
  4. a file that is mostly valid UTF-8 is UTF-8 with a few invalid bytes (a cut character): each record
     holding one is an "invalid encoding" problem and the rest of the file is fine — one bad byte never
     flips a file to another encoding;
  5. otherwise the legacy encodings of CANDIDATES that decode the whole file are scored by
     charset-normalizer (how garbled each decoding looks). The best one is used when it is plausible and
     no other candidate gives different text that looks about as plausible (then the file is refused:
     too little text to tell);
  6. with no plausible decoding, a file whose high bytes stand alone as Latin-1 accents do (`caf\xe9`) is
     UTF-8 with stray bytes, as in 4; any other file is refused.
A refusal is a DataError naming the file, the candidates and data.encoding — never a silent guess: Big5,
EUC-KR, Shift-JIS and EUC-JP bytes all decode "fine" as GB18030, into mojibake.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

from qflash.errors import DataError

AUTO = "auto"
# Legacy encodings tried on a file that is not UTF-8, by the name shown to the user. Each codec is the
# Windows superset of the standard (cp950 of Big5, cp949 of EUC-KR, cp932 of Shift-JIS): exports from
# Windows use those, and the superset decodes every file of the standard identically.
CANDIDATES = {
    "gb18030": "gb18030",
    "big5 (cp950)": "cp950",
    "euc-kr (cp949)": "cp949",
    "shift_jis (cp932)": "cp932",
    "euc-jp": "euc_jp",
    "cp1251": "cp1251",
    "koi8-r": "koi8_r",
}
# charset-normalizer's "chaos": the share of characters that look garbled (0-100). Text decoded with its
# own encoding scores 0-6, in another one 12 and more (Korean read as GB18030: 14.6; French as cp1251: 16).
# The best decoding must score at most PLAUSIBLE_CHAOS, and no rival (scored up to MAX_CHAOS, the library's
# default) may come within AMBIGUITY_MARGIN of it with different text.
MAX_CHAOS = 20.0
PLAUSIBLE_CHAOS = 10.0
AMBIGUITY_MARGIN = 5.0
# Below this many bytes >= 0x80 the garble score is noise (8 Big5 characters score better as Shift-JIS
# half-width katakana than as themselves): nothing is plausible in a file that several candidates decode.
MIN_HIGH_BYTES = 100
SINGLE_BYTE = {codecs.lookup(c).name for c in ("cp1251", "koi8_r")}

_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # bytes that surrogateescape could not decode
_VALID_NON_ASCII = re.compile("[^\x00-\x7f\udc80-\udcff]")
_ISOLATED_HIGH_BYTE = re.compile(rb"(?<![\x80-\xff])[\x80-\xff](?![\x80-\xff])")
_HIGH_BYTE = re.compile(rb"[\x80-\xff]")
# Text in a multi-byte or Cyrillic encoding has high bytes in runs; Latin-1 accents stand alone.
_MAX_ISOLATED_SHARE = 0.2
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),  # before UTF-16: its BOM starts with UTF-16's
    (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"),
)


@dataclass
class DecodedText:
    text: str
    encoding: str
    """How the file was decoded, as shown to the user: `utf-8`, `big5 (cp950)`, `cp1252 (data.encoding)`."""
    bad_lines: dict[int, str]
    """line -> reason, for lines holding bytes that are not valid in `encoding`."""


def decode_bytes(raw: bytes, path: str = "<data>", encoding: str = AUTO) -> DecodedText:
    """Decode a whole file following the rules in the module docstring; a DataError when they cannot decide."""
    if raw.startswith(codecs.BOM_UTF8):
        return _with_bad_lines(raw[len(codecs.BOM_UTF8):], "utf-8", "utf-8 (BOM)")
    for bom, codec in _BOMS:
        if raw.startswith(bom):
            return DecodedText(raw.decode(codec), codec, {})  # UnicodeDecodeError: the caller reports the file
    try:
        return DecodedText(raw.decode("utf-8"), "utf-8", {})
    except UnicodeDecodeError:
        pass
    if encoding != AUTO:
        return _with_bad_lines(raw, encoding, f"{encoding} (data.encoding)")
    if _mostly_valid_utf8(raw):
        return _with_bad_lines(raw, "utf-8", "utf-8")
    try:
        name, text = detect_legacy(raw, path)
    except _NothingPlausible as e:
        if _high_bytes_stand_alone(raw):
            return _with_bad_lines(raw, "utf-8", "utf-8")
        raise _refusal(path, e.why, e.example) from None
    return DecodedText(text, name, {})


def _mostly_valid_utf8(raw: bytes) -> bool:
    """The invalid bytes are the exception, not the encoding."""
    as_utf8 = raw.decode("utf-8", "surrogateescape")
    return len(_VALID_NON_ASCII.findall(as_utf8)) >= len(_ESCAPED_BYTE.findall(as_utf8))


def _high_bytes_stand_alone(raw: bytes) -> bool:
    """Most bytes >= 0x80 stand alone, between ASCII ones, as Latin-1 accents do (`caf\xe9`)."""
    return len(_ISOLATED_HIGH_BYTE.findall(raw)) > _MAX_ISOLATED_SHARE * len(_HIGH_BYTE.findall(raw))


class _NothingPlausible(Exception):
    def __init__(self, why: str, example: str = "big5"):
        super().__init__(why)
        self.why, self.example = why, example
        """example: a codec to name in the hint about data.encoding."""


def detect_legacy(raw: bytes, path: str) -> tuple[str, str]:
    """(name, text) of the one plausible decoding among CANDIDATES. A DataError when several are about as
    plausible; _NothingPlausible when none is."""
    from charset_normalizer import from_bytes

    decodable = {name: codec for name, codec in CANDIDATES.items() if _decodes(raw, codec)}
    if not decodable:
        raise _NothingPlausible("no candidate encoding decodes all of its bytes (two encodings mixed in one file?)")
    example = next(iter(decodable.values()))
    high = len(_HIGH_BYTE.findall(raw))
    if len(decodable) > 1 and high < MIN_HIGH_BYTES:
        raise _NothingPlausible(f"it holds too little non-ASCII text ({high} bytes) to tell "
                                f"{', '.join(decodable)} apart, and each of them decodes it", example)
    matches = from_bytes(raw, cp_isolation=list(decodable.values()), threshold=MAX_CHAOS / 100,
                         preemptive_behaviour=False, enable_fallback=False)
    by_codec = {codecs.lookup(codec).name: name for name, codec in decodable.items()}
    scored = [(by_codec[codecs.lookup(m.encoding).name], m) for m in matches
              if codecs.lookup(m.encoding).name in by_codec and _fits_its_script(m)]
    scored.sort(key=lambda s: (s[1].percent_chaos, -s[1].percent_coherence))
    if not scored or scored[0][1].percent_chaos > PLAUSIBLE_CHAOS:
        raise _NothingPlausible(f"decoded as {', '.join(decodable)} it looks garbled", example)
    (best_name, best), rivals = scored[0], scored[1:]
    text = str(best)
    for name, m in rivals:
        if m.percent_chaos <= best.percent_chaos + AMBIGUITY_MARGIN and str(m) != text:
            raise _refusal(path, f"it reads as plausible text both as {best_name} and as {name}, which give "
                                 f"different characters ({_first_difference(text, str(m), best_name, name)})",
                           decodable[best_name])
    return best_name, text


def _fits_its_script(match) -> bool:
    """A single-byte Cyrillic code page decodes any high byte: only text in which charset-normalizer
    recognises a language counts (Latin-1 accents read as Cyrillic letters do not)."""
    return codecs.lookup(match.encoding).name not in SINGLE_BYTE or match.percent_coherence > 0


def _decodes(raw: bytes, codec: str) -> bool:
    try:
        raw.decode(codec)
    except UnicodeDecodeError:
        return False
    return True


def _first_difference(a: str, b: str, name_a: str, name_b: str) -> str:
    """The first line on which two decodings differ, as each gives it (shortened)."""
    for n, (line_a, line_b) in enumerate(zip(a.split("\n"), b.split("\n")), start=1):
        if line_a != line_b:
            return f"line {n}: {name_a} {line_a[:40]!r}, {name_b} {line_b[:40]!r}"
    return "they differ in length"


def _refusal(path: str, why: str, example: str = "big5") -> DataError:
    names = ", ".join(CANDIDATES)
    return DataError(
        f"{path}: cannot tell the text encoding: the file is not UTF-8, and {why}. Candidates: {names}. "
        f"Re-save the file as UTF-8, or set data.encoding to the file's encoding (e.g. data.encoding={example})"
    )


def _with_bad_lines(raw: bytes, codec: str, name: str) -> DecodedText:
    try:
        return DecodedText(raw.decode(codec), name, {})
    except UnicodeDecodeError:
        pass
    # surrogateescape keeps every undecodable byte as one lone surrogate, so positions stay exact.
    text = raw.decode(codec, "surrogateescape")
    bad: dict[int, str] = {}
    line, counted_to = 1, 0
    for m in _ESCAPED_BYTE.finditer(text):
        line += text.count("\n", counted_to, m.start())
        counted_to = m.start()
        if line not in bad:
            column = m.start() - text.rfind("\n", 0, m.start())
            byte = ord(m.group()) - 0xDC00
            shown = "UTF-8" if codec == "utf-8" else name
            bad[line] = (f"byte {byte:#04x} is not valid {shown} (column {column}); re-save the file as UTF-8, "
                         "or set data.encoding to the file's encoding")
    return DecodedText(text, name, bad)


def printable(text: str) -> str:
    """Text that may hold undecodable bytes, with those bytes shown as \\xNN."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
