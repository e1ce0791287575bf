"""Schemathesis hooks for blipsearch's contract test (loaded through SCHEMATHESIS_HOOKS by run.sh).

They narrow what schemathesis generates where JSON Schema cannot say what the OpenAPI document
says in words, so that a "valid" case is one the document calls valid:

- Uploads: the field `image` is binary, with `encoding.image.contentType` listing the formats
  the server reads. Schemathesis fills such a field with arbitrary bytes unless a strategy is
  registered for the media type, and arbitrary bytes are not an image (the server answers 415
  or 422, as documented). The strategies below make real images of each declared format, small
  and varied, so that positive tests exercise decoding, embedding and captioning.
- Text search: `q` must leave the text model something to read (see the operation's
  description); positive cases whose `q` might not are dropped.
- Parameters that depend on each other, which the parameters' descriptions state and JSON
  Schema cannot: `min_itm_prob` needs reranking (refused with `rerank_k=0`), `rerank_budget`
  needs `min_itm_prob`, and `include_self` applies to a search by an indexed image (refused
  with an uploaded one). Positive cases that
  combine them are dropped; the server's 400 for them is tested in tests/api.rs.
- Product filters and facets name attributes of the collection (`filter`, `facets`; GET
  /api/status lists them): the collection of this run has none, so the server refuses every
  one (400). Positive cases with them are dropped; tests/api.rs tests them on a catalogue.
- Products (`POST /api/products`): the `product` part is a JSON object. Schemathesis's
  coverage phase sometimes sends a "positive" case whose `product` is not an object (an empty
  part on the wire), which the schema does not allow and the server rightly refuses (400);
  such cases are dropped.
- Product attributes (`POST /api/products`): names must be identifiers, and a name keeps the
  type of its first value for good (the attributes' description; JSON Schema in OpenAPI 3.0
  cannot say either). Positive cases get their attribute names rewritten into identifiers that
  carry the value's type (`k_` keyword, `n_` number, `b_` bool, `d_` date), so that names are
  valid and no request conflicts with the types an earlier one recorded.
- Multipart `text` fields: a part is text on the wire, so a negative case that turns a text
  into an object or a number sends text again, which the server rightly accepts; such cases
  are dropped.
"""

import struct
import unicodedata
import zlib

import schemathesis
from hypothesis import strategies as st
from schemathesis.core.file_samples import FILE_SAMPLES

SIDES = st.integers(min_value=1, max_value=24)
COLOURS = st.tuples(*[st.integers(min_value=0, max_value=255)] * 3)


def _png(width, height, rgb):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def _bmp(width, height, rgb):
    row = bytes(reversed(rgb)) * width
    row += b"\x00" * (-len(row) % 4)
    pixels = row * height
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, len(pixels), 2835, 2835, 0, 0)
    header = struct.pack("<2sIHHI", b"BM", 14 + len(info) + len(pixels), 0, 0, 14 + len(info))
    return header + info + pixels


def _tiff(width, height, rgb):
    # Little-endian baseline RGB TIFF, uncompressed, one strip: header, pixels, then the IFD.
    pixels = bytes(rgb) * (width * height)
    bits_at = 8 + len(pixels)
    ifd_at = bits_at + 6
    entries = [
        (256, 4, 1, width),  # ImageWidth
        (257, 4, 1, height),  # ImageLength
        (258, 3, 3, bits_at),  # BitsPerSample: 8, 8, 8 (stored before the IFD)
        (259, 3, 1, 1),  # Compression: none
        (262, 3, 1, 2),  # PhotometricInterpretation: RGB
        (273, 4, 1, 8),  # StripOffsets
        (277, 3, 1, 3),  # SamplesPerPixel
        (278, 4, 1, height),  # RowsPerStrip
        (279, 4, 1, len(pixels)),  # StripByteCounts
        (284, 3, 1, 1),  # PlanarConfiguration: chunky
    ]
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        packed = struct.pack("<H", value) + b"\x00\x00" if kind == 3 and count == 1 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, count) + packed
    ifd += struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", ifd_at) + pixels + struct.pack("<HHH", 8, 8, 8) + ifd


def _drawn(make):
    return st.builds(make, SIDES, SIDES, COLOURS)


schemathesis.openapi.media_type("image/png", _drawn(_png))
schemathesis.openapi.media_type("image/bmp", _drawn(_bmp))
schemathesis.openapi.media_type("image/tiff", _drawn(_tiff))
# Schemathesis's own smallest files of these formats.
schemathesis.openapi.media_type("image/jpeg", st.just(FILE_SAMPLES["jpg"]))
schemathesis.openapi.media_type("image/gif", st.just(FILE_SAMPLES["gif"]))
schemathesis.openapi.media_type("image/webp", st.just(FILE_SAMPLES["webp"]))


# Characters the text model surely reads (each becomes a token): ASCII letters, digits and the
# punctuation BLIP's pre_caption keeps, and letters of scripts whose Unicode blocks have long been
# complete (so that the tokenizer's older Unicode tables agree with Python's).
_READABLE_BLOCKS = [
    (0x00C0, 0x024F),  # Latin-1 letters, Latin Extended-A and -B
    (0x0370, 0x03FF),  # Greek
    (0x0400, 0x04FF),  # Cyrillic
    (0x3041, 0x30FF),  # Hiragana, Katakana
    (0x4E00, 0x9FA5),  # CJK Unified Ideographs
    (0xAC00, 0xD7A3),  # Hangul syllables
]
_DROPPED_BY_PRE_CAPTION = set('.!"()*#:;~')


def _surely_readable(c):
    if c.isascii():
        return c.isprintable() and not c.isspace() and c not in _DROPPED_BY_PRE_CAPTION
    return unicodedata.category(c)[0] in "LN" and any(lo <= ord(c) <= hi for lo, hi in _READABLE_BLOCKS)


def _query_within_bounds(q):
    """Whether the server takes `q` (the operation's description): bytes, nesting, words, content."""
    if not isinstance(q, str) or len(q.encode()) > 2000 or len(q.split()) > 256:
        return False
    depth = deepest = 0
    for c in q:
        if c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth = max(depth - 1, 0)
    return deepest <= 8 and any(_surely_readable(c) for c in q)


def _is_day(s):
    """Whether `s` is a calendar day YYYY-MM-DD, as the server reads dates (year 0000 included)."""
    if len(s) != 10 or s[4] != "-" or s[7] != "-":
        return False
    y, m, d = s[0:4], s[5:7], s[8:10]
    if not (y.isascii() and y.isdigit() and m.isascii() and m.isdigit() and d.isascii() and d.isdigit()):
        return False
    y, m, d = int(y), int(m), int(d)
    leap = y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)
    days = [31, 29 if leap else 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
    return 1 <= m <= 12 and 1 <= d <= days[m - 1]


def _typed_name(i, value):
    """An identifier for the `i`-th attribute that says the type `value` gives it."""
    if isinstance(value, bool):
        kind = "b"
    elif isinstance(value, (int, float)):
        kind = "n"
    elif isinstance(value, str) and _is_day(value):
        kind = "d"
    else:
        kind = "k"
    return f"{kind}_{i}"


@schemathesis.hook
def map_case(ctx, case):
    meta = case.meta
    positive = meta is not None and meta.generation.mode.is_positive
    body = case.body
    if (
        positive
        and case.operation.path == "/api/products"
        and isinstance(body, dict)
        and isinstance(body.get("product"), dict)
        and isinstance(body["product"].get("attributes"), dict)
    ):
        # Texts with surrounding white space are left out: what counts as white space differs
        # between Python and the server, and the server reads the value trimmed.
        attrs = [v for v in body["product"]["attributes"].values() if not (isinstance(v, str) and v != v.strip())]
        body["product"]["attributes"] = {_typed_name(i, v): v for i, v in enumerate(attrs)}
    return case


@schemathesis.hook
def filter_case(ctx, case):
    meta = case.meta
    positive = meta is not None and meta.generation.mode.is_positive
    query = case.query if isinstance(case.query, dict) else {}
    if positive and case.operation.path.startswith("/api/search") and ("filter" in query or "facets" in query):
        return False
    if positive and case.operation.path == "/api/search":
        if "min_itm_prob" in query and str(query.get("rerank_k")) == "0":
            return False
        if "rerank_budget" in query and "min_itm_prob" not in query:
            return False
        if "q" in query:
            return _query_within_bounds(query["q"])
    if (
        positive
        and case.operation.path == "/api/search/image"
        and case.media_type == "multipart/form-data"
        and str(query.get("include_self")).lower() == "true"
    ):
        return False
    body = case.body
    if (
        positive
        and case.operation.path == "/api/products"
        and case.media_type == "multipart/form-data"
        and not (isinstance(body, dict) and isinstance(body.get("product"), dict))
    ):
        return False
    if case.media_type == "multipart/form-data" and isinstance(body, dict) and "text" in body:
        texts = body["text"]
        return isinstance(texts, list) and all(isinstance(t, str) for t in texts)
    return True


if __name__ == "__main__":
    # Writes one sample of each format into the folder given, to check that the server reads them.
    import os
    import sys

    out = sys.argv[1]
    samples = {
        "png": _png(5, 3, (200, 30, 30)),
        "bmp": _bmp(5, 3, (30, 200, 30)),
        "tif": _tiff(5, 3, (30, 30, 200)),
        "jpg": FILE_SAMPLES["jpg"],
        "gif": FILE_SAMPLES["gif"],
        "webp": FILE_SAMPLES["webp"],
    }
    for ext, data in samples.items():
        with open(os.path.join(out, f"sample.{ext}"), "wb") as f:
            f.write(data)
