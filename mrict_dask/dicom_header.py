"""DICOM headers -> catalog rows: read only the bytes before the pixel data, never raise for a bad file.

:func:`read_headers` fetches the first bytes of each file of a batch (one concurrent ``cat_ranges`` call on
object storage), parses them with pydicom up to the pixel data and fetches more only for the few files whose
header is longer. Every file gives exactly one row (a dict with every column of
:data:`~mrict_dask.catalog.CATALOG_COLUMNS` plus ``bytes_read``); a bad file gets a ``read_error`` reason.
:func:`row_from_dataset` fills the same columns from an already parsed data set (e.g. DICOM JSON metadata).
"""

from __future__ import annotations

import io
import logging
import math
import os
import struct
import threading
import warnings
from typing import Any

from .catalog import STORAGE_ERROR, empty_row
from .io import Location, is_transient

log = logging.getLogger(__name__)


# Remote reads start small (object storage bills and waits by the byte); pilot files then size the rest.
HEAD_BYTES_REMOTE = 4 * 1024
_PILOTS = 4
# Local reads cost no transfer, but copying more than a typical header costs time on every file.
HEAD_BYTES_LOCAL = 16 * 1024
# A header (everything before the pixel data) longer than this is refused rather than fetched.
MAX_HEADER_BYTES = 64 * 1024 * 1024

_HAS_PREAD = hasattr(os, "pread")
_PIXEL_TAGS = frozenset((0x7FE00010, 0x7FE00008, 0x7FE00009))
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
_DICOMDIR_TAGS = (0x00041130, 0x00041200, 0x00041202, 0x00041212, 0x00041220)
_DEFLATED = "1.2.840.10008.1.2.1.99"
_NO_META_TS = {(True, True): "1.2.840.10008.1.2", (False, True): "1.2.840.10008.1.2.1",
               (False, False): "1.2.840.10008.1.2.2"}

_DICOMDIR_REASON = "DICOMDIR (media directory, not an image)"
_NOT_DICOM_REASON = "not DICOM: no DICM preamble and no valid dataset"

# (column, tag, kind). kinds: str (one value), mstr (all values joined by backslash), int, float,
# floatsN (exactly N numbers or null).
_FIELDS: tuple[tuple[str, int, str], ...] = (
    ("sop_class_uid", 0x00080016, "str"),
    ("sop_instance_uid", 0x00080018, "str"),
    ("series_uid", 0x0020000E, "str"),
    ("study_uid", 0x0020000D, "str"),
    ("frame_of_reference_uid", 0x00200052, "str"),
    ("patient_id", 0x00100020, "str"),
    ("modality", 0x00080060, "str"),
    ("study_date", 0x00080020, "str"),
    ("study_time", 0x00080030, "str"),
    ("series_date", 0x00080021, "str"),
    ("series_time", 0x00080031, "str"),
    ("series_number", 0x00200011, "int"),
    ("series_description", 0x0008103E, "str"),
    ("image_type", 0x00080008, "mstr"),
    ("instance_number", 0x00200013, "int"),
    ("image_position", 0x00200032, "floats3"),
    ("image_orientation", 0x00200037, "floats6"),
    ("pixel_spacing", 0x00280030, "floats2"),
    ("slice_thickness", 0x00180050, "float"),
    ("spacing_between_slices", 0x00180088, "float"),
    ("rows", 0x00280010, "int"),
    ("columns", 0x00280011, "int"),
    ("number_of_frames", 0x00280008, "int"),
    ("bits_allocated", 0x00280100, "int"),
    ("samples_per_pixel", 0x00280002, "int"),
    ("photometric", 0x00280004, "str"),
    ("rescale_slope", 0x00281053, "float"),
    ("rescale_intercept", 0x00281052, "float"),
    ("rescale_type", 0x00281054, "str"),
    ("pixel_padding_value", 0x00280120, "int"),
    ("gantry_tilt", 0x00181120, "float"),
    ("acquisition_number", 0x00200012, "int"),
    ("echo_time", 0x00180081, "float"),
    ("echo_numbers", 0x00180086, "int"),
    ("repetition_time", 0x00180080, "float"),
    ("inversion_time", 0x00180082, "float"),
    ("scanning_sequence", 0x00180020, "mstr"),
    ("sequence_variant", 0x00180021, "mstr"),
    ("sequence_name", 0x00180024, "str"),
    ("mr_acquisition_type", 0x00180023, "str"),
    ("contrast_agent", 0x00180010, "str"),
    ("convolution_kernel", 0x00181210, "mstr"),
    ("body_part", 0x00180015, "str"),
    ("manufacturer", 0x00080070, "str"),
    # what tells the volumes of a 4D series apart (time, diffusion weighting)
    ("acquisition_time", 0x00080032, "str"),
    ("temporal_position", 0x00200100, "int"),
    ("trigger_time", 0x00181060, "float"),
    ("diffusion_b_value", 0x00189087, "float"),
    ("diffusion_direction", 0x00189089, "floats3"),
)
# Vendors' private diffusion tags (classic single-frame MR), each trusted only under its private creator:
# (column, private creator element, the creator's name, tag, kind).
_PRIVATE_DIFFUSION: tuple[tuple[str, int, str, int, str], ...] = (
    ("diffusion_b_value", 0x00190010, "SIEMENS MR HEADER", 0x0019100C, "float"),
    ("diffusion_direction", 0x00190010, "SIEMENS MR HEADER", 0x0019100E, "floats3"),
    ("diffusion_b_value", 0x00430010, "GEMS_PARM_01", 0x00431039, "float"),
    ("diffusion_b_value", 0x20010010, "Philips Imaging DD 001", 0x20011003, "float"),
)
# Gradient directions written as three single values: (private creator element, the creator's name, x/y/z tags)
_PRIVATE_GRADIENTS = ((0x00190010, "GEMS_ACQU_01", (0x001910BB, 0x001910BC, 0x001910BD)),
                      (0x20050010, "Philips MR Imaging DD 001", (0x200510B0, 0x200510B1, 0x200510B2)))
_PIXEL_REPRESENTATION = 0x00280103
_SHARED_FG = 0x52009229
_PER_FRAME_FG = 0x52009230
_CONTRAST_AGENT_SEQ = 0x00180012  # ContrastBolusAgentSequence: enhanced objects code the agent here
# Everything else is skipped by seeking, without being read or decoded.
_SPECIFIC_TAGS = sorted({t for _, t, _ in _FIELDS} | {_PIXEL_REPRESENTATION, _SHARED_FG, _PER_FRAME_FG,
                                                     _CONTRAST_AGENT_SEQ}
                        | {t for _, c, _, t, _ in _PRIVATE_DIFFUSION} | {c for _, c, _, _, _ in _PRIVATE_DIFFUSION}
                        | {t for c, _, tags in _PRIVATE_GRADIENTS for t in (c, *tags)}
                        | set(_DICOMDIR_TAGS[:4]))

# Implicit VR files carry no VR: the dictionary VR of the binary-valued tags we read.
_BINARY_VR = {0x00189087: "FD", 0x00189089: "FD", 0x0019100E: "FD", 0x20011003: "FL",
              0x200510B0: "FL", 0x200510B1: "FL", 0x200510B2: "FL",
              0x00280010: "US", 0x00280011: "US", 0x00280100: "US", 0x00280002: "US", 0x00280103: "US",
              0x00280120: "US or SS"}
_BINARY_CODES = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d", "UV": "Q", "SV": "q"}
_CHARSET_VRS = {"SH", "LO", "ST", "LT", "UT", "UC", "PN"}
_VALID_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"OB", b"OD",
              b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI",
              b"UL", b"UN", b"UR", b"US", b"UT", b"UV"}
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}


# ------------------------------------------------------------------------------------------ reading
class _NeedMore(Exception):
    def __init__(self, end: int):
        super().__init__(end)
        self.end = end


class _Truncated(Exception):
    def __init__(self, pos: int, n: int, size: int):
        super().__init__(pos, n, size)
        self.pos, self.n, self.size = pos, n, size


class _StrictIO:
    """A read-only view of the first bytes of a file of known size that refuses to read short.

    pydicom accepts short reads silently (a cut-off value comes back shorter than its length). This
    reader instead records the need for more bytes (the buffer is a prefix of the file) or a truncation
    (the file itself ends first). pydicom converts some exceptions raised inside sequences into
    ``OSError``, hence the recorded ``problem`` that callers check first.
    """

    def __init__(self, buf: bytes, size: int):
        self._buf, self._size, self._pos = buf, size, 0
        self.problem: Exception | None = None

    def read(self, n: int | None = -1) -> bytes:
        p = self._pos
        end = self._size if n is None or n < 0 else p + n
        if end > len(self._buf):
            if end > self._size:
                if p >= self._size:
                    return b""
                self.problem = _Truncated(p, end - p, self._size)
            else:
                self.problem = _NeedMore(end)
            raise self.problem
        self._pos = end
        return self._buf[p:end]

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        pass

def _looks_like_dataset(buf: bytes, size: int) -> bool | None:
    """Whether a file without the DICM prefix starts like a DICOM data set (None: need more bytes).

    Accepts the first elements only if, in one of the three encodings, their tags ascend from an early
    group, their VRs are valid (explicit VR) and their lengths fit inside the file. Text and random bytes
    fail this at once; forcing pydicom on them would produce a garbage data set instead.
    """
    complete = len(buf) >= size
    need_more = False
    for implicit, little in ((False, True), (True, True), (False, False)):
        e = "<" if little else ">"
        pos, prev, count, ok = 0, -1, 0, True
        while count < 3:
            if pos >= size:
                break
            if pos + 12 > len(buf) and not complete:
                need_more = True
                ok = False
                break
            if pos + 8 > len(buf):
                ok = False
                break
            group, elem = struct.unpack_from(e + "HH", buf, pos)
            tag = group << 16 | elem
            if tag <= prev or group > 0x7FE0 or (count == 0 and (group % 2 or group > 0x0028)):
                ok = False
                break
            if implicit:
                (length,) = struct.unpack_from(e + "I", buf, pos + 4)
                hdr = 8
            else:
                vr = buf[pos + 4:pos + 6]
                if vr not in _VALID_VRS:
                    ok = False
                    break
                if vr in _LONG_VRS:
                    if pos + 12 > len(buf) or buf[pos + 6:pos + 8] != b"\0\0":
                        ok = False
                        break
                    (length,) = struct.unpack_from(e + "I", buf, pos + 8)
                    hdr = 12
                else:
                    (length,) = struct.unpack_from(e + "H", buf, pos + 6)
                    hdr = 8
            count += 1
            if length == 0xFFFFFFFF:
                break  # a sequence or encapsulated value: cannot skip it here, and it is well-formed so far
            if pos + hdr + length > size:
                ok = False
                count -= 1
                break
            pos += hdr + length
            prev = tag
        if ok and (count >= 2 or (count == 1 and pos >= size)):
            return True
    return None if need_more else False


def _text(raw: Any, ds: Any) -> str | None:
    """The string value of an element as written (multi-values backslash-joined), or None if empty."""
    value = raw.value
    if value is None:
        return None
    if not isinstance(value, bytes):  # already converted by pydicom (e.g. undefined-length items)
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            text = "\\".join(str(v) for v in value)
        else:
            text = str(value)
    else:
        vr = raw.VR
        try:
            if b"\x1b" in value:  # ISO 2022 escapes: let pydicom apply the character sets
                raise UnicodeDecodeError("ascii", value, 0, 1, "escape")
            text = value.decode("ascii")
        except UnicodeDecodeError:
            if vr in _CHARSET_VRS or vr is None or vr == "UN":
                try:
                    conv = ds[raw.tag].value
                    text = "\\".join(str(v) for v in conv) if type(conv).__name__ == "MultiValue" else str(conv)
                except Exception:
                    text = value.decode("latin-1")
            else:
                text = value.decode("latin-1")
    if "\\" in text:
        text = "\\".join(p.strip(" \x00") for p in text.split("\\")).strip("\\")
    else:
        text = text.strip(" \x00")
    return text or None


def _numbers(raw: Any, ds: Any, tag: int) -> list[float] | None:
    """All numeric values of an element, decoding binary VRs by endianness and text VRs by parsing."""
    value = raw.value
    if value is None:
        return None
    if isinstance(value, bytes):
        vr = raw.VR
        if vr in (None, "UN"):
            vr = _BINARY_VR.get(tag)
        if vr == "US or SS":
            pr = _elements(ds).get(_PIXEL_REPRESENTATION)
            signed = False
            if pr is not None:
                nums = _numbers(pr, ds, _PIXEL_REPRESENTATION)
                signed = bool(nums and nums[0] == 1)
            vr = "SS" if signed else "US"
        code = _BINARY_CODES.get(vr or "")
        if code is not None:
            width = struct.calcsize(code)
            count = len(value) // width
            if not count:
                return None
            e = "<" if raw.is_little_endian else ">"
            return [float(v) for v in struct.unpack_from(f"{e}{count}{code}", value)]
    text = _text(raw, ds)
    if text is None:
        return None
    out = []
    for part in text.split("\\"):
        v = float(part)
        if not math.isfinite(v):
            raise ValueError("non-finite number")
        out.append(v)
    return out


def _convert(raw: Any, ds: Any, tag: int, kind: str) -> Any:
    value = raw.value
    if kind == "str" and type(value) is bytes and b"\x1b" not in value and b"\\" not in value:
        try:  # the common case, kept short: one plain ASCII value
            return value.decode("ascii").strip(" \x00") or None
        except UnicodeDecodeError:
            pass
    if kind == "str" or kind == "mstr":
        text = _text(raw, ds)
        if text is not None and kind == "str" and "\\" in text and raw.VR in ("UI", None):
            text = text.split("\\")[0]
        return text
    nums = _numbers(raw, ds, tag)
    if not nums:
        return None
    if kind == "int":
        v = nums[0]
        return int(v) if float(v).is_integer() else None
    if kind == "float":
        return float(nums[0])
    n = int(kind[len("floats"):])
    return [float(v) for v in nums] if len(nums) == n else None


def _elements(ds: Any) -> dict[int, Any]:
    """Top-level elements by integer tag, unconverted (cached on the data set: it is looked up often)."""
    els = getattr(ds, "_scan_elements", None)
    if els is None:
        els = {int(t): e for t, e in ds.items()}
        object.__setattr__(ds, "_scan_elements", els)
    return els


def _fill_fields(row: dict, ds: Any, end: int | None = None) -> None:
    """Fill ``row`` from ``ds``; with ``end`` (the file is cut there), only from values that end before it: what
    a cut value holds depends on how many bytes were read, never on the file."""
    els = _elements(ds)
    for col, tag, kind in _FIELDS:
        raw = els.get(tag)
        if raw is None or (end is not None and _runs_past(raw, end)):
            continue
        try:
            row[col] = _convert(raw, ds, tag, kind)
        except Exception:  # one malformed value leaves its column empty, never the whole row
            row[col] = None
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        if row["sop_class_uid"] is None:
            row["sop_class_uid"] = _meta_str(meta, 0x00020002)
        if row["sop_instance_uid"] is None:
            row["sop_instance_uid"] = _meta_str(meta, 0x00020003)
        row["transfer_syntax_uid"] = _meta_str(meta, 0x00020010)
    if row["transfer_syntax_uid"] is None:
        row["transfer_syntax_uid"] = _NO_META_TS.get(tuple(ds.original_encoding))
    if _PER_FRAME_FG in els or _SHARED_FG in els:
        try:
            _fill_functional_groups(row, ds)
        except Exception:
            log.debug("functional groups unreadable", exc_info=True)
    if row["diffusion_b_value"] is None or row["diffusion_direction"] is None:
        _fill_private_diffusion(row, ds, els)


def _fill_private_diffusion(row: dict, ds: Any, els: dict[int, Any]) -> None:
    """b-value and gradient direction from the vendor's private tags, where the standard ones are absent."""

    def creator(tag: int) -> str:
        raw = els.get(tag)
        try:
            return (_text(raw, ds) or "") if raw is not None else ""
        except Exception:
            return ""

    for col, creator_tag, name, tag, kind in _PRIVATE_DIFFUSION:
        raw = els.get(tag)
        if row[col] is not None or raw is None or creator(creator_tag).upper() != name.upper():
            continue
        try:
            value = _convert(raw, ds, tag, kind)
        except Exception:
            continue
        if col == "diffusion_b_value" and value is not None:
            value = float(value) % 1e9  # GE adds 1e9 (or multiples) to flag how the b-value was set
        row[col] = value
    for creator_tag, name, tags in _PRIVATE_GRADIENTS:
        if row["diffusion_direction"] is not None or not all(t in els for t in tags) or \
                creator(creator_tag).upper() != name.upper():
            continue
        try:
            vec = [_convert(els[t], ds, t, "float") for t in tags]
        except Exception:
            continue
        if all(v is not None for v in vec):
            row["diffusion_direction"] = [float(v) for v in vec]


def _runs_past(raw: Any, end: int) -> bool:
    start, length = getattr(raw, "value_tell", None), getattr(raw, "length", None)
    return start is None or length is None or length == 0xFFFFFFFF or start + length > end


def _meta_str(meta: Any, tag: int) -> str | None:
    raw = _elements(meta).get(tag)
    if raw is None:
        return None
    try:
        text = _text(raw, meta)
    except Exception:
        return None
    return text.split("\\")[0] if text else None


def _fg_value(item: Any, seq_tag: int, tag: int) -> Any:
    if item is None or seq_tag not in item:
        return None
    seq = item[seq_tag].value
    if not seq or tag not in seq[0]:
        return None
    return seq[0][tag].value


def _floats(value: Any, n: int | None = None) -> list[float] | None:
    if value is None or value == "":
        return None
    vals = list(value) if type(value).__name__ == "MultiValue" or isinstance(value, (list, tuple)) else [value]
    try:
        out = [float(v) for v in vals]
    except (TypeError, ValueError):
        return None
    if (n is not None and len(out) != n) or not all(math.isfinite(v) for v in out):
        return None
    return out


def _fill_functional_groups(row: dict, ds: Any) -> None:
    """Enhanced (multi-frame) objects: geometry lives in the shared and per-frame functional groups."""
    shared = ds[_SHARED_FG].value[0] if _SHARED_FG in ds and ds[_SHARED_FG].value else None
    frames = list(ds[_PER_FRAME_FG].value) if _PER_FRAME_FG in ds and ds[_PER_FRAME_FG].value else []
    if frames:
        row["frame_positions"] = [_floats(_fg_value(f, 0x00209113, 0x00200032), 3) for f in frames]

    def shared_or_common(seq_tag: int, tag: int, n: int | None) -> Any:
        v = _floats(_fg_value(shared, seq_tag, tag), n)
        if v is not None or not frames:
            return v
        per = [_floats(_fg_value(f, seq_tag, tag), n) for f in frames]
        return per[0] if per[0] is not None and all(p == per[0] for p in per) else None

    # The functional groups are authoritative in enhanced objects: they win over any top-level value.
    orientation = shared_or_common(0x00209116, 0x00200037, 6)
    if orientation is not None:
        row["image_orientation"] = orientation
    for col, tag, n in (("pixel_spacing", 0x00280030, 2), ("slice_thickness", 0x00180050, None),
                        ("spacing_between_slices", 0x00180088, None)):
        v = shared_or_common(0x00289110, tag, n)
        if v is not None:
            row[col] = v if n else v[0]
    for col, tag in (("rescale_slope", 0x00281053), ("rescale_intercept", 0x00281052)):
        v = shared_or_common(0x00289145, tag, None)
        if v is not None:
            row[col] = v[0]
    if row["rescale_type"] is None:
        for item in [shared, *frames[:1]]:
            v = _fg_value(item, 0x00289145, 0x00281054)
            if v:
                row["rescale_type"] = str(v).strip()
                break
    # Enhanced MR: sequence timing (what tells a T1 from its tags) and contrast live in functional groups too
    for col, seq_tag, tag in (("repetition_time", 0x00189112, 0x00180080), ("echo_time", 0x00189114, 0x00189082),
                              ("inversion_time", 0x00189115, 0x00189079)):
        v = shared_or_common(seq_tag, tag, None)
        if v:
            row[col] = v[0]
    if not row["contrast_agent"]:
        given = [_fg_value(item, 0x00189341, 0x00189342) for item in [shared, *frames[:1]]]
        if any(str(v or "").strip().upper() == "YES" for v in given):
            row["contrast_agent"] = _coded_agent(ds) or "administered (ContrastBolusUsageSequence)"


def _coded_agent(ds: Any) -> str | None:
    """The agent's name from ContrastBolusAgentSequence (its CodeMeaning), if given."""
    try:
        items = ds[_CONTRAST_AGENT_SEQ].value if _CONTRAST_AGENT_SEQ in ds else []
        meaning = items[0][0x00080104].value if items and 0x00080104 in items[0] else None
    except Exception:
        return None
    return str(meaning).strip() or None if meaning else None


def _is_dicomdir(ds: Any) -> bool:
    meta = getattr(ds, "file_meta", None)
    if meta is not None and _meta_str(meta, 0x00020002) == _DICOMDIR_SOP_CLASS:
        return True
    els = _elements(ds)
    return any(t in els for t in _DICOMDIR_TAGS)


def _expected_pixel_bytes(row: dict) -> int | None:
    rows, cols, bits = row["rows"], row["columns"], row["bits_allocated"]
    if not rows or not cols or not bits:
        return None
    frames = row["number_of_frames"] or 1
    spp = row["samples_per_pixel"] or 1
    if spp == 3 and (row["photometric"] or "").startswith("YBR_FULL_422"):
        spp = 2  # chroma subsampled: two values per pixel
    return (rows * cols * frames * spp * bits + 7) // 8


def _pixel_info(row: dict, buf: bytes, size: int, pos: int, implicit: bool, little: bool) -> int | None:
    """Fill pixel_data_offset/_ok (and a truncation reason) from the pixel data element at ``pos``.

    Returns the number of bytes needed when the buffer ends before the element's first item headers.
    """
    e = "<" if little else ">"
    if not implicit and pos + 6 > len(buf):
        return pos + 64 if pos + 6 <= size else _cut_element(row, pos, size)
    if not implicit and buf[pos + 4:pos + 6] not in _VALID_VRS:
        implicit = True  # some writers switch to implicit VR mid-file (pydicom reads these too)
    if implicit:
        hdr = 8
    else:
        hdr = 12 if buf[pos + 4:pos + 6] in _LONG_VRS else 8
    if pos + hdr > size:
        return _cut_element(row, pos, size)
    if pos + hdr > len(buf):
        return pos + 64
    if hdr == 12 or implicit:
        (length,) = struct.unpack_from(e + "I", buf, pos + hdr - 4)
    else:
        (length,) = struct.unpack_from(e + "H", buf, pos + 6)
    offset = pos + hdr
    row["pixel_data_offset"] = offset
    available = max(0, size - offset)
    if length == 0xFFFFFFFF:
        # Encapsulated: a basic offset table item, then the first fragment item.
        first = offset
        for step in ("offset table", "first fragment"):
            if first + 8 > size:
                row["read_error"] = (f"truncated: pixel data has {available} of at least {first + 8 - offset} "
                                     f"bytes (ends before its {step})")
                return None
            if first + 8 > len(buf):
                return first + 64
            group, elem, item_len = struct.unpack_from(e + "HHI", buf, first)
            if (group, elem) == (0xFFFE, 0xE0DD):
                row["read_error"] = "unreadable: encapsulated pixel data has no fragments"
                return None
            if (group, elem) != (0xFFFE, 0xE000):
                row["read_error"] = "unreadable: encapsulated pixel data without items"
                return None
            if step == "offset table":
                bot = (first + 8, item_len)
                first = first + 8 + item_len
        need = first + 8 + item_len - offset
        bot_start, bot_len = bot
        if bot_len >= 4 and bot_start + bot_len <= len(buf):
            # the last frame must at least start inside the file
            last = struct.unpack_from(f"{e}{bot_len // 4}I", buf, bot_start)[-1]
            need = max(need, first - offset + last + 8)
        if need > available:
            row["read_error"] = f"truncated: pixel data has {available} of at least {need} bytes"
            return None
        row["pixel_data_ok"] = True
        return None
    expected = _expected_pixel_bytes(row)
    if available < length or (expected is not None and available < expected):
        total = max(length, expected or 0)
        row["read_error"] = f"truncated: pixel data has {min(available, total)} of {total} bytes"
        return None
    if expected is not None and length < expected:
        row["read_error"] = f"bad pixel data: element holds {length} bytes, the image needs {expected}"
        return None
    row["pixel_data_ok"] = True
    return None


def _cut_element(row: dict, pos: int, size: int) -> None:
    row["pixel_data_offset"] = None
    row["read_error"] = f"truncated: the file ends inside the pixel data element header at byte {size}"
    return None


def _at_pixel_data(tag: int, vr: Any, length: int) -> bool:
    return tag in _PIXEL_TAGS


def _dcmread(fp: Any, force: bool) -> Any:
    """``dcmread(fp, stop_before_pixels=True, force=force, specific_tags=...)``, minus its per-call tag
    conversion (``read_partial`` is what ``dcmread`` calls)."""
    from pydicom.filereader import read_partial

    # plain ints, not pydicom Tags: pydicom tests every element against this set, and int == int is cheap
    return read_partial(fp, stop_when=_at_pixel_data, force=force, specific_tags=_SPECIFIC_TAGS)

def unreadable(exc: BaseException, storage: bool = False) -> str:
    msg = str(exc).splitlines()[0] if str(exc) else ""
    head = STORAGE_ERROR if storage and is_transient(exc) else "unreadable"
    return f"{head}: {type(exc).__name__}: {msg[:200]}".rstrip(": ")


def _parse(url: str, buf: bytes, size: int) -> dict | int:
    """One catalog row from the first ``len(buf)`` bytes of a file of ``size`` bytes, or the number of
    bytes needed when the header does not end inside ``buf``."""
    row = empty_row(url, size)
    complete = len(buf) >= size
    if len(buf) < 132 and not complete:
        return 132
    has_dicm = buf[128:132] == b"DICM"
    if has_dicm and buf[132:134] not in (b"\x02\x00", b"\x00\x02"):
        # DICM but no file meta group: accept only a plausible data set right after the prefix
        looks = _looks_like_dataset(buf[132:], size - 132)
        if looks is None:
            return min(size, 2 * len(buf))
        if not looks:
            row["read_error"] = "not DICOM: DICM prefix without file meta or a valid dataset"
            return row
    if not has_dicm:
        looks = _looks_like_dataset(buf, size)
        if looks is None:
            return min(size, 2 * len(buf))
        if not looks:
            row["read_error"] = _NOT_DICOM_REASON
            return row

    fast_ds = None
    fp = io.BytesIO(buf)
    try:
        fast_ds = _dcmread(fp, force=not has_dicm)
    except Exception:
        fast_ds = None
    if fast_ds is not None:
        if _is_dicomdir(fast_ds):
            return _dicomdir_row(row, fast_ds)
        implicit, little = fast_ds.original_encoding
        pos = fp.tell()
        meta_ts = _meta_str(fast_ds.file_meta, 0x00020010) if getattr(fast_ds, "file_meta", None) else None
        if meta_ts == _DEFLATED:
            return _deflated_row(row, buf, size, fast_ds, has_dicm)
        if pos + 4 <= len(buf):
            (tag_g, tag_e) = struct.unpack_from("<HH" if little else ">HH", buf, pos)
            if (tag_g << 16 | tag_e) in _PIXEL_TAGS:
                _fill_fields(row, fast_ds)
                need = _pixel_info(row, buf, size, pos, implicit, little)
                return need if need is not None else row

    # No pixel data inside the buffer: parse again, refusing short reads, to learn whether the header
    # continues past the buffer, the file is cut, or the object simply has no pixel data.
    sio = _StrictIO(buf, size)
    strict_ds = None
    try:
        strict_ds = _dcmread(sio, force=not has_dicm)
    except Exception as exc:
        problem = sio.problem or exc
        if isinstance(problem, _NeedMore):
            return problem.end
        if fast_ds is not None:
            _fill_fields(row, fast_ds, end=size if isinstance(problem, _Truncated) else None)
        if isinstance(problem, _Truncated):
            row["read_error"] = (f"truncated: a value at byte {problem.pos} needs {problem.n} bytes, "
                                 f"the file ends at {problem.size}")
        else:
            row["read_error"] = unreadable(problem)
        return row
    if sio.problem is not None:  # raised inside pydicom and swallowed there
        if isinstance(sio.problem, _NeedMore):
            return sio.problem.end
        if fast_ds is not None:
            _fill_fields(row, fast_ds, end=size)
        p = sio.problem
        row["read_error"] = f"truncated: a value at byte {p.pos} needs {p.n} bytes, the file ends at {p.size}"
        return row
    if sio.tell() > size:
        _fill_fields(row, strict_ds)
        row["read_error"] = f"truncated: a value runs to byte {sio.tell()}, the file ends at {size}"
        return row
    if _is_dicomdir(strict_ds):
        return _dicomdir_row(row, strict_ds)
    _fill_fields(row, strict_ds)
    pos = sio.tell()
    implicit, little = strict_ds.original_encoding
    if pos + 4 <= len(buf):
        (tag_g, tag_e) = struct.unpack_from("<HH" if little else ">HH", buf, pos)
        if (tag_g << 16 | tag_e) in _PIXEL_TAGS:
            need = _pixel_info(row, buf, size, pos, implicit, little)
            return need if need is not None else row
    if row["rows"] and row["columns"]:
        row["read_error"] = f"truncated: image header without pixel data (the file ends at byte {size})"
    return row


def _dicomdir_row(row: dict, ds: Any) -> dict:
    row["is_dicomdir"] = True
    row["read_error"] = _DICOMDIR_REASON
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        row["sop_class_uid"] = _meta_str(meta, 0x00020002)
        row["sop_instance_uid"] = _meta_str(meta, 0x00020003)
        row["transfer_syntax_uid"] = _meta_str(meta, 0x00020010)
    return row


def _deflated_row(row: dict, buf: bytes, size: int, ds: Any, has_dicm: bool) -> dict | int:
    """Deflated data sets are compressed as a whole: read the full file and check the inflated pixel data."""
    if len(buf) < size:
        return size
    import pydicom

    _fill_fields(row, ds)
    try:
        full = pydicom.dcmread(io.BytesIO(buf), force=not has_dicm,
                               specific_tags=[*_SPECIFIC_TAGS, *_PIXEL_TAGS])
        elem = next((full.get_item(t) for t in _PIXEL_TAGS if t in full), None)
    except Exception as exc:
        row["read_error"] = unreadable(exc)
        return row
    if elem is None:
        if row["rows"] and row["columns"]:
            row["read_error"] = "truncated: image header without pixel data"
        return row
    got = len(elem.value or b"")
    expected = _expected_pixel_bytes(row)
    if expected is not None and got < expected:
        row["read_error"] = f"truncated: pixel data has {got} of {expected} bytes"
    else:
        row["pixel_data_ok"] = True
    return row


class _Reader:
    """Fetches byte ranges of many files: one concurrent ``cat_ranges`` on remote stores, plain reads locally."""

    def __init__(self, fs: Any):
        self.fs = fs
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        self.local = protocol in ("file", "local")
        self.head = HEAD_BYTES_LOCAL if self.local else HEAD_BYTES_REMOTE

    def path(self, url: str) -> str:
        if self.local:
            return url
        import fsspec.core

        return fsspec.core.strip_protocol(url)

    def fetch(self, reqs: list[tuple[str, int, int]]) -> list[bytes | BaseException]:
        if not reqs:
            return []
        if self.local:
            out: list[bytes | BaseException] = []
            for path, start, end in reqs:
                try:
                    if _HAS_PREAD:
                        fd = os.open(path, os.O_RDONLY)
                        try:
                            out.append(os.pread(fd, end - start, start))
                        finally:
                            os.close(fd)
                    else:
                        with open(path, "rb", buffering=0) as fh:
                            fh.seek(start)
                            out.append(fh.read(end - start))
                except Exception as exc:
                    out.append(exc)
            return out
        paths = [r[0] for r in reqs]
        starts = [r[1] for r in reqs]
        ends = [r[2] for r in reqs]
        res = list(self.fs.cat_ranges(paths, starts, ends, on_error="return"))
        # one retry for transient object-store errors; a missing or forbidden object stays an error
        retry = [i for i, r in enumerate(res)
                 if isinstance(r, BaseException) and not isinstance(r, (FileNotFoundError, PermissionError))]
        if retry:
            again = self.fs.cat_ranges([paths[i] for i in retry], [starts[i] for i in retry],
                                       [ends[i] for i in retry], on_error="return")
            for i, r in zip(retry, again):
                res[i] = r
        return res


def _read_many(items: list[tuple[str, int]], reader: _Reader) -> list[dict]:
    """Rows for ``items`` in order; bytes fetched in rounds until every header is complete.

    On object storage a few pilot files, spread over the batch, are read first; the rest of the batch then
    starts with a read sized to the longest pilot header (files of one collection have similar headers),
    so long-header collections need one round and short-header ones fetch little.
    """
    rows: list[dict | None] = [None] * len(items)
    todo = []
    for i, (url, size) in enumerate(items):
        if size <= 0:
            rows[i] = empty_row(url, 0)
            rows[i]["read_error"] = "not DICOM: empty file (0 bytes)"
        else:
            todo.append(i)
    if reader.local or len(todo) < 4 * _PILOTS:
        _fetch_rounds(items, todo, reader.head, reader, rows)
        return rows  # type: ignore[return-value]
    step = len(todo) // _PILOTS
    pilots = [todo[k * step] for k in range(_PILOTS)]
    _fetch_rounds(items, pilots, reader.head, reader, rows)
    ends = [r["pixel_data_offset"] for r in (rows[i] for i in pilots) if r and r["pixel_data_offset"]]
    first = reader.head
    if ends:
        first = max(first, -(-(max(ends) * 9 // 8 + 64) // 1024) * 1024)
    chosen = set(pilots)
    _fetch_rounds(items, [i for i in todo if i not in chosen], first, reader, rows)
    return rows  # type: ignore[return-value]


def _fetch_rounds(items: list[tuple[str, int]], idx: list[int], first: int, reader: _Reader,
                  rows: list[dict | None]) -> None:
    bufs: dict[int, bytes] = dict.fromkeys(idx, b"")
    want: dict[int, int] = {i: min(items[i][1], first) for i in idx}
    while want:
        order = sorted(want)
        got = reader.fetch([(reader.path(items[i][0]), len(bufs[i]), want[i]) for i in order])
        next_want: dict[int, int] = {}
        for i, data in zip(order, got):
            url, size = items[i]
            if isinstance(data, BaseException):
                rows[i] = empty_row(url, size)
                rows[i]["read_error"] = unreadable(data, storage=True)
                rows[i]["bytes_read"] = len(bufs[i])
                continue
            bufs[i] += data
            buf = bufs[i]
            if len(data) < want[i] - (len(buf) - len(data)):
                size = len(buf)  # the file is shorter than listed (changed since listing): trust the bytes
            try:
                res = _parse(url, buf, size)
            except Exception as exc:  # a bug or a pydicom surprise must not lose the row
                res = empty_row(url, items[i][1])
                res["read_error"] = unreadable(exc)
            if isinstance(res, dict):
                res["size"] = items[i][1]
                res["bytes_read"] = len(buf)
                rows[i] = res
                continue
            # what the parse needs, plus a margin that grows with the header (few rounds, little overshoot)
            more = min(size, int(res) + max(reader.head, len(buf) // 2))
            if more <= len(buf):  # cannot happen for a consistent parse; refuse rather than loop
                rows[i] = empty_row(url, items[i][1])
                rows[i]["read_error"] = "unreadable: header parse did not converge"
                rows[i]["bytes_read"] = len(buf)
            elif more > MAX_HEADER_BYTES:
                rows[i] = empty_row(url, items[i][1])
                rows[i]["read_error"] = f"unreadable: header longer than {MAX_HEADER_BYTES // 2**20} MiB"
                rows[i]["bytes_read"] = len(buf)
            else:
                next_want[i] = more
        want = next_want
        for i in list(bufs):
            if rows[i] is not None:
                del bufs[i]


class _Quiet:
    """pydicom warns (and logs) about every odd value; a scan of thousands of files must stay readable.

    Process-wide state (warning filters, the pydicom logger's level), so entries are counted: the first one in
    quiets, the last one out restores, whatever the threads (a DICOMweb batch reads series in parallel).
    """

    _lock = threading.Lock()
    _depth = 0
    _saved: tuple[Any, int] | None = None  # the entered catch_warnings, the logger's level before

    def __enter__(self):
        with _Quiet._lock:
            if _Quiet._depth == 0:
                logger = logging.getLogger("pydicom")
                caught = warnings.catch_warnings()
                caught.__enter__()
                warnings.simplefilter("ignore")
                _Quiet._saved = (caught, logger.level)
                logger.setLevel(logging.CRITICAL)
            _Quiet._depth += 1
        return self

    def __exit__(self, *exc):
        with _Quiet._lock:
            _Quiet._depth -= 1
            if _Quiet._depth == 0 and _Quiet._saved is not None:
                caught, level = _Quiet._saved
                _Quiet._saved = None
                logging.getLogger("pydicom").setLevel(level)
                caught.__exit__(None, None, None)
        return False


def read_header(url: str | Location, storage_options: dict | None = None, size: int | None = None) -> dict:
    """One catalog row for the file at ``url``; never raises for a bad or missing file."""
    loc = Location.of(url, storage_options)
    try:
        fs = loc.fs
        if size is None:
            size = loc.size()
    except Exception as exc:
        row = empty_row(loc.url, 0)
        row["size"] = None
        row["read_error"] = unreadable(exc)
        return row
    return read_headers([(loc.url, size)], fs)[0]


def read_headers(items: list[tuple[str, int]], fs: Any) -> list[dict]:
    """Catalog rows, in order, for (URL, size) items that are all on the filesystem ``fs``; never raises."""
    if not items:
        return []
    with _Quiet():
        return _read_many(list(items), _Reader(fs))


def row_from_dataset(url: str, size: int | None, ds: Any) -> dict:
    """The catalog row of an already parsed data set (e.g. from DICOM JSON metadata), filled by the same code
    as a file's header; columns only the file's bytes can tell (pixel data offset, bytes read) stay empty."""
    row = empty_row(url, size or 0)
    if size is None:
        row["size"] = None
    with _Quiet():
        if _is_dicomdir(ds):
            return _dicomdir_row(row, ds)
        _fill_fields(row, ds)
    return row
