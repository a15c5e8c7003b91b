"""Fuzz: mutated real and synthetic DICOM bytes never break the scan or volume assembly.

Seeds are pydicom's bundled test files (several vendors' encodings) and small series written by the
generator's own DICOM writer (`mrict_dask.synth.dicom_writer`, the code that writes the synthetic corpus).
Mutations: truncation, bit flips, overwritten VR codes, huge declared lengths, removed pixel data,
duplicated / deleted / swapped elements, inserted garbage. The promises checked:

- ``read_header`` never raises and returns one well-typed row; a cut file is never catalogued as fine;
- ``read_volume`` returns an image or raises ``VolumeError`` (anything else escapes the per-series boundary);
- a folder of mutated files gives one catalog row per file, and planning from that catalog does not raise;
- a declared length of ~4 GiB neither allocates it nor hangs.

Example counts are printed at the end of each test (``pytest -rP`` or ``-s`` shows them).
"""

from __future__ import annotations

import math
import os
import random
import struct
import time
import tracemalloc
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mrict_dask.catalog import CATALOG_COLUMNS
from mrict_dask.dicom_header import read_header
from mrict_dask.errors import VolumeError
from mrict_dask.scan import scan

pytestmark = pytest.mark.timeout(300)

EXAMPLES = int(os.environ.get("MRICT_FUZZ_EXAMPLES", "0")) or None  # more examples on demand (bug hunting)
FUZZ = settings(max_examples=120, deadline=5000, derandomize=not EXAMPLES, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
if EXAMPLES:
    FUZZ = settings(FUZZ, max_examples=EXAMPLES)

COUNTS: Counter = Counter()  # cases tried per test, printed at the end of each test

PYDICOM_SEEDS = ("CT_small.dcm", "MR_small.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm",
                 "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "ExplVR_BigEndNoMeta.dcm",
                 "ExplVR_LitEndNoMeta.dcm", "image_dfl.dcm", "rtdose.dcm", "nested_priv_SQ.dcm",
                 "UN_sequence.dcm", "JPEG2000.dcm", "SC_rgb_small_odd.dcm", "reportsi.dcm", "no_meta_group_length.dcm")

_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"}
PIXEL_TAG = 0x7FE00010


# --------------------------------------------------------------------------------------------- seeds
@dataclass(frozen=True)
class Element:
    tag: int
    start: int  # offset of the element's tag
    value_start: int
    length: int  # as declared (0xFFFFFFFF: undefined)
    explicit: bool
    little: bool
    long_header: bool  # 4-byte length field (explicit long VR or implicit)


@dataclass(frozen=True)
class Seed:
    name: str
    data: bytes
    elements: tuple[Element, ...]  # top-level elements, file meta included

    @property
    def pixels_at_end(self) -> bool:
        """An image (Rows present) whose pixel data is the last element and runs to the end of the file: any
        cut of it is a truncation."""
        last = self.elements[-1] if self.elements else None
        return bool(last and last.tag == PIXEL_TAG and last.length != 0xFFFFFFFF
                    and any(e.tag == 0x00280010 for e in self.elements)
                    and last.value_start + last.length == len(self.data))


def _walk(data: bytes) -> tuple[Element, ...]:
    """Top-level elements of a Part 10 file or a bare data set, as pydicom's own generator sees them."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import data_element_generator

    out: list[Element] = []

    def run(start: int, implicit: bool, little: bool, meta: bool) -> int:
        fp = DicomBytesIO(data)
        fp.seek(start)
        stop = (lambda tag, vr, length: tag >> 16 != 2) if meta else None
        for raw in data_element_generator(fp, implicit, little, stop_when=stop, defer_size=256):
            vr = raw.VR
            long_header = implicit or vr in _LONG_VRS
            hdr = 8 if implicit or not long_header else 12
            if isinstance(raw, tuple):  # RawDataElement
                length, value_tell = raw.length, raw.value_tell
            else:  # a sequence of undefined length, parsed by pydicom
                length, value_tell = 0xFFFFFFFF, raw.file_tell
            out.append(Element(int(raw.tag), value_tell - hdr, value_tell, length, not implicit, little,
                               long_header))
        return fp.tell()

    ts = None
    if data[128:132] == b"DICM":
        pos = run(132, False, True, meta=True)
        meta = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data), stop_before_pixels=True).file_meta
        ts = str(meta.get("TransferSyntaxUID", ""))
        if ts == "1.2.840.10008.1.2.1.99":  # deflated: only the meta group is plain bytes
            return tuple(out)
        implicit = ts == "1.2.840.10008.1.2"
        little = ts != "1.2.840.10008.1.2.2"
        run(pos, implicit, little, meta=False)
    else:
        ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data), force=True, stop_before_pixels=True)
        implicit, little = ds.original_encoding
        run(0, implicit, little, meta=False)
    return tuple(out)


def _synthetic_files(n: int = 6) -> dict[str, bytes]:
    """A small MR series, a CT series, an RLE MR slice, an enhanced MR and a text SR, via the generator's writer."""
    from pydicom.uid import RLELossless

    from mrict_dask.synth import dicom_writer as w
    from mrict_dask.synth.anatomy import Geometry

    rng = np.random.default_rng(7)
    patient = w.PatientInfo("FUZZ-0001", "Fuzz^Patient", "19600101", "F")
    study = w.StudyInfo(uid=w.make_uid("fuzz", "study"), modality="MR", date="20200102", time="101500",
                        accession="ACC1", description="MRI BRAIN", study_id="1", institution="Fuzz Hospital",
                        referring="Ref^Doc", manufacturer="SIEMENS", model="Avanto", station="ST1",
                        frame_uid=w.make_uid("fuzz", "for"), age="060Y")
    mr_series = w.SeriesInfo(uid=w.make_uid("fuzz", "mr"), number=7, description="AX T1 POST GD", role="t1c",
                             time="102000", image_type=["ORIGINAL", "PRIMARY", "AXIAL"],
                             protocol={"scanning_sequence": "SE", "sequence_variant": "SP", "acquisition_type": "2D",
                                       "tr": 500.0, "te": 12.0, "contrast": "GADOLINIUM"})
    ct_series = w.SeriesInfo(uid=w.make_uid("fuzz", "ct"), number=2, description="HEAD 2.5mm STND", role="ct",
                             time="103000", image_type=["ORIGINAL", "PRIMARY", "AXIAL"],
                             protocol={"recon_diameter": 250.0, "kernel": "STANDARD"})
    row, col = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    files: dict[str, bytes] = {}
    for k in range(n):
        pos = np.array([-10.0, -12.0, 20.0 + 2.5 * k])
        mr = w.mr_image(patient, study, mr_series, sop_uid=w.make_uid("fuzz", "mr", k), instance=n - k,
                        pixels=rng.integers(0, 4000, (16, 16)), row=row, col=col, position=pos,
                        pixel_spacing=(0.9, 0.9), thickness=2.5, spacing_between=2.5, window=(500, 1000))
        files[f"mr{k}"] = w.encode(mr)
        ct = w.ct_image(patient, study, ct_series, sop_uid=w.make_uid("fuzz", "ct", k), instance=k + 1,
                        pixels=rng.integers(-1000, 2000, (16, 16)), row=row, col=col, position=pos,
                        pixel_spacing=(0.5, 0.5), thickness=2.5, window=(40, 80), intercept=-1024.0,
                        padding=-2000)
        files[f"ct{k}"] = w.encode(ct)
    rle = w.mr_image(patient, study, mr_series, sop_uid=w.make_uid("fuzz", "rle"), instance=99,
                     pixels=rng.integers(0, 4000, (16, 16)), row=row, col=col, position=np.array([0.0, 0.0, 99.0]),
                     pixel_spacing=(0.9, 0.9), thickness=2.5, spacing_between=None, window=(500, 1000))
    files["mr_rle"] = w.encode(rle, RLELossless)
    geom = Geometry(size=(12, 12, 4), spacing=(1.0, 1.0, 2.0), origin=np.zeros(3), axes=np.eye(3))
    emr = w.enhanced_mr(patient, study, mr_series, sop_uid=w.make_uid("fuzz", "emr"),
                        volume=rng.integers(0, 4000, (4, 12, 12)).astype(np.uint16), geometry=geom, thickness=2.0,
                        spacing_between=2.0, window=(500, 1000))
    files["mr_enhanced"] = w.encode(emr)
    sr = w.text_sr(patient, study, ct_series, sop_uid=w.make_uid("fuzz", "sr"), text="dose report")
    files["sr"] = w.encode(sr)
    return files


@pytest.fixture(scope="module")
def synthetic() -> dict[str, bytes]:
    return _synthetic_files()


@pytest.fixture(scope="module")
def seeds(synthetic) -> list[Seed]:
    from pydicom.data import get_testdata_file

    out = []
    for name in PYDICOM_SEEDS:
        with open(get_testdata_file(name), "rb") as fh:
            data = fh.read()
        out.append(Seed(name, data, _walk(data)))
    for name in ("mr0", "ct0", "mr_rle", "mr_enhanced", "sr"):
        out.append(Seed(name, synthetic[name], _walk(synthetic[name])))
    assert all(s.elements for s in out)
    return out


# --------------------------------------------------------------------------------------------- mutations
VR_CODES = [b"OB", b"OW", b"SQ", b"UN", b"UT", b"US", b"UL", b"DS", b"CS", b"UI", b"FD", b"AT", b"ZZ", b"\x00\x00",
            b"\xff\xff", b"ob"]
HUGE = [0xFFFFFFF0, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, 0x10000000]


def _put_length(buf: bytearray, el: Element, value: int) -> None:
    e = "<" if el.little else ">"
    if el.long_header:
        struct.pack_into(e + "I", buf, el.value_start - 4, value & 0xFFFFFFFF)
    else:
        struct.pack_into(e + "H", buf, el.value_start - 2, value & 0xFFFF)


def _end(seed: Seed, k: int) -> int:
    el = seed.elements[k]
    if el.length != 0xFFFFFFFF:
        return min(len(seed.data), el.value_start + el.length)
    return seed.elements[k + 1].start if k + 1 < len(seed.elements) else len(seed.data)


def mutate(seed: Seed, kind: str, draw: random.Random) -> tuple[bytes, str]:
    """One mutation of ``seed``; returns the bytes and a description (for failure messages)."""
    data = seed.data
    buf = bytearray(data)
    n = len(seed.elements)
    k = draw.randrange(n)
    el = seed.elements[k]
    if kind == "truncate":
        cut = draw.randrange(len(data))
        return data[:cut], f"truncate at {cut}"
    if kind == "flip":
        where = []
        for _ in range(draw.randint(1, 8)):
            p = draw.randrange(len(buf))
            buf[p] ^= 1 << draw.randrange(8)
            where.append(p)
        return bytes(buf), f"bit flips at {where}"
    if kind == "vr":
        explicit = [i for i, e in enumerate(seed.elements) if e.explicit]
        if not explicit:
            return mutate(seed, "flip", draw)
        k = draw.choice(explicit)
        code = draw.choice(VR_CODES)
        buf[seed.elements[k].start + 4:seed.elements[k].start + 6] = code
        return bytes(buf), f"VR of element {seed.elements[k].tag:08x} -> {code!r}"
    if kind == "length":
        value = draw.choice(HUGE) if el.long_header else draw.choice([0xFFFF, 0xFFFE, 0x8000])
        if draw.random() < 0.3:
            value = max(0, el.length + draw.choice([-3, -1, 1, 2, 7, 1000])) if el.length != 0xFFFFFFFF else 0
        _put_length(buf, el, value)
        return bytes(buf), f"length of {el.tag:08x} -> {value:#x}"
    if kind == "drop_pixels":
        pix = [e for e in seed.elements if e.tag == PIXEL_TAG]
        if not pix:
            return mutate(seed, "truncate", draw)
        if draw.random() < 0.5:
            return data[:pix[0].start], "pixel data removed (file ends before it)"
        _put_length(buf, pix[0], 0)
        return bytes(buf[:pix[0].value_start]), "pixel data emptied (length 0)"
    if kind == "duplicate":
        end = _end(seed, k)
        return data[:end] + data[el.start:end] + data[end:], f"element {el.tag:08x} duplicated"
    if kind == "delete":
        end = _end(seed, k)
        return data[:el.start] + data[end:], f"element {el.tag:08x} deleted"
    if kind == "swap":
        if k + 1 >= n:
            return mutate(seed, "delete", draw)
        a, b = seed.elements[k], seed.elements[k + 1]
        end_a, end_b = _end(seed, k), _end(seed, k + 1)
        if end_a != b.start:
            return mutate(seed, "flip", draw)
        return data[:a.start] + data[b.start:end_b] + data[a.start:end_a] + data[end_b:], \
            f"elements {a.tag:08x} and {b.tag:08x} swapped"
    if kind == "garbage":
        p = draw.randrange(len(data))
        junk = bytes(draw.randrange(256) for _ in range(draw.randint(1, 64)))
        return data[:p] + junk + data[p:], f"{len(junk)} garbage bytes inserted at {p}"
    raise AssertionError(kind)


KINDS = ("truncate", "flip", "vr", "length", "drop_pixels", "duplicate", "delete", "swap", "garbage")
_INT_COLS = {"size", "series_number", "instance_number", "rows", "columns", "number_of_frames", "bits_allocated",
             "samples_per_pixel", "pixel_padding_value", "acquisition_number", "echo_numbers", "pixel_data_offset"}
_FLOAT_COLS = {"slice_thickness", "spacing_between_slices", "rescale_slope", "rescale_intercept", "gantry_tilt",
               "echo_time", "repetition_time", "inversion_time"}
_LIST_COLS = {"image_position": 3, "image_orientation": 6, "pixel_spacing": 2}


def check_row(row: dict, url: str, size: int, what: str) -> None:
    """A catalog row is complete and well typed, whatever the bytes were."""
    assert isinstance(row, dict), what
    missing = set(CATALOG_COLUMNS) - set(row)
    assert not missing, (what, missing)
    assert row["url"] == url and row["size"] == size, what
    assert isinstance(row["read_error"], str), what
    for col in _INT_COLS:
        v = row[col]
        assert v is None or (isinstance(v, int) and not isinstance(v, bool)), (what, col, v)
    for col in _FLOAT_COLS:
        v = row[col]
        assert v is None or (isinstance(v, float) and math.isfinite(v)), (what, col, v)
    for col, n in _LIST_COLS.items():
        v = row[col]
        assert v is None or (len(v) == n and all(isinstance(x, float) and math.isfinite(x) for x in v)), \
            (what, col, v)
    for col in ("is_dicomdir", "pixel_data_ok"):
        assert isinstance(row[col], bool), (what, col)
    assert not (row["pixel_data_ok"] and row["read_error"]), (what, row["read_error"])
    if row["read_error"]:
        kinds = ("not DICOM", "truncated", "unreadable", "bad pixel data", "DICOMDIR (media directory, not an image)")
        assert row["read_error"].split(":")[0] in kinds, (what, row["read_error"])


# --------------------------------------------------------------------------------------------- read_header
@pytest.mark.xdist_group("fuzz_read_header")
@FUZZ
@given(data=st.data())
def test_read_header_never_raises_on_mutated_files(seeds, tmp_path_factory, data):
    seed = data.draw(st.sampled_from(seeds), label="seed")
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    rnd = random.Random(data.draw(st.integers(0, 2**32 - 1), label="rng"))
    blob, what = mutate(seed, kind, rnd)
    what = f"{seed.name}: {what}"
    path = tmp_path_factory.getbasetemp() / "hdr_fuzz.dcm"
    path.write_bytes(blob)
    t0 = time.perf_counter()
    row = read_header(str(path))
    assert time.perf_counter() - t0 < 5, what
    COUNTS["read_header"] += 1
    check_row(row, str(path), len(blob), what)
    # A cut is never catalogued as a usable image. (Cut exactly between two elements, what is left can be a
    # well-formed header-only object, like pydicom's own header-only files: then it is no image at all.)
    if kind in ("truncate", "drop_pixels") and seed.pixels_at_end and len(blob) < len(seed.data):
        assert row["read_error"] or not row["pixel_data_ok"], f"{what}: a cut file catalogued as a usable image"


@pytest.mark.xdist_group("fuzz_read_header")
def test_read_header_fuzz_count():
    """Runs after the fuzz test above (file order, same worker): it really tried that many cases."""
    assert COUNTS["read_header"] >= 100 or EXAMPLES


@pytest.mark.parametrize("value", [0xFFFFFFF0, 0xFFFFFFFF, 0x7FFFFFFF])
def test_huge_declared_lengths_are_neither_allocated_nor_hung_on(seeds, tmp_path, value):
    """Every element of every seed in turn declares ~4 GiB (or undefined length): bounded memory and time."""
    cases = 0
    tracemalloc.start()
    try:
        for seed in seeds:
            for el in seed.elements:
                if not el.long_header:
                    continue
                buf = bytearray(seed.data)
                _put_length(buf, el, value)
                path = tmp_path / f"{seed.name}-{el.tag:08x}"
                path.write_bytes(buf)
                tracemalloc.reset_peak()
                t0 = time.perf_counter()
                row = read_header(str(path))
                elapsed = time.perf_counter() - t0
                _, peak = tracemalloc.get_traced_memory()
                what = f"{seed.name}: length of {el.tag:08x} -> {value:#x}"
                check_row(row, str(path), len(buf), what)
                assert peak < 64 * 2**20, (what, peak)
                assert elapsed < 5, (what, elapsed)
                if el.tag == PIXEL_TAG and value != 0xFFFFFFFF:
                    assert row["read_error"], f"{what}: pixel data longer than the file catalogued as fine"
                cases += 1
    finally:
        tracemalloc.stop()
    COUNTS["huge_lengths"] += cases
    assert cases > 100


# --------------------------------------------------------------------------------------------- read_volume
@pytest.fixture(scope="module")
def series(synthetic, tmp_path_factory) -> dict[str, list[str]]:
    """The generator-written MR and CT series (6 slices each) as files."""
    root = tmp_path_factory.mktemp("fuzz_series")
    out: dict[str, list[str]] = {"mr": [], "ct": []}
    for name, blob in synthetic.items():
        if name[:2] in out and name[2:].isdigit():
            p = root / name
            p.write_bytes(blob)
            out[name[:2]].append(str(p))
    return out


def test_unmutated_series_assemble(series):
    from mrict_dask.volume import read_volume

    for files in series.values():
        img = read_volume(files)
        assert img.GetSize() == (16, 16, 6)


@pytest.mark.xdist_group("fuzz_read_volume")
@FUZZ
@given(data=st.data())
def test_read_volume_raises_only_volume_error(series, tmp_path_factory, data):
    from mrict_dask.volume import read_volume

    modality = data.draw(st.sampled_from(["mr", "ct"]), label="modality")
    files = series[modality]
    k = data.draw(st.integers(0, len(files) - 1), label="file")
    with open(files[k], "rb") as fh:
        original = fh.read()
    seed = Seed(f"{modality}{k}", original, _walk(original))
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    blob, what = mutate(seed, kind, random.Random(data.draw(st.integers(0, 2**32 - 1), label="rng")))
    what = f"{seed.name}: {what}"
    bad = tmp_path_factory.getbasetemp() / "vol_fuzz.dcm"
    bad.write_bytes(blob)
    urls = files[:k] + [str(bad)] + files[k + 1:]
    COUNTS["read_volume"] += 1
    t0 = time.perf_counter()
    try:
        img = read_volume(urls)
    except VolumeError as err:
        assert str(err).strip(), what
        return
    finally:
        assert time.perf_counter() - t0 < 10, what
    # pydicom reads a cut value short without complaint: the reader must notice, whatever was cut
    assert kind != "drop_pixels", f"{what}: a slice without pixels was assembled"
    assert not (kind == "truncate" and len(blob) < len(original)), f"{what}: a cut slice was assembled"
    size = img.GetSize()
    assert size[2] >= 2 and all(np.isfinite(img.GetSpacing())) and min(img.GetSpacing()) > 0, what


@pytest.mark.xdist_group("fuzz_read_volume")
def test_read_volume_fuzz_count():
    assert COUNTS["read_volume"] >= 100 or EXAMPLES


def test_read_volume_with_a_4gib_declared_element_stays_bounded(series, tmp_path):
    import SimpleITK as sitk

    from mrict_dask.volume import read_volume

    files = series["ct"]
    truth = sitk.GetArrayFromImage(read_volume(files))
    with open(files[2], "rb") as fh:
        original = fh.read()
    seed = Seed("ct2", original, _walk(original))
    cases = 0
    tracemalloc.start()
    try:
        for el in seed.elements:
            if not el.long_header:
                continue
            buf = bytearray(original)
            _put_length(buf, el, 0xFFFFFFF0)
            bad = tmp_path / f"ct2-{el.tag:08x}"
            bad.write_bytes(buf)
            tracemalloc.reset_peak()
            try:
                img = read_volume(files[:2] + [str(bad)] + files[3:])
            except VolumeError:
                pass
            else:  # accepted only if every voxel is what was written (the pixels were all there)
                assert np.array_equal(sitk.GetArrayFromImage(img), truth), f"{el.tag:08x}: a wrong volume"
            _, peak = tracemalloc.get_traced_memory()
            assert peak < 64 * 2**20, (el.tag, peak)
            cases += 1
    finally:
        tracemalloc.stop()
    COUNTS["huge_lengths"] += cases
    assert cases >= 2


# --------------------------------------------------------------------------------------------- scan + plan
def test_scan_of_a_mutated_folder_accounts_for_every_file_and_plans(seeds, synthetic, tmp_path):
    """Hundreds of mutated files mixed with intact series: one row each, and planning from them does not raise."""
    from mrict_dask.config import Config
    from mrict_dask.plan import make_plan
    from mrict_dask.stacks import stacks_from_catalog

    rnd = random.Random(20240607)
    folder = tmp_path / "in"
    folder.mkdir()
    written = []
    for name, blob in synthetic.items():  # intact series: the plan must still find them
        p = folder / f"intact_{name}"
        p.write_bytes(blob)
        written.append(str(p))
    series_seeds = [Seed(n, b, _walk(b)) for n, b in synthetic.items() if n[:2] in ("mr", "ct") and n[2:].isdigit()]
    for i in range(240):
        seed = rnd.choice(seeds + series_seeds)
        blob, _ = mutate(seed, rnd.choice(KINDS), rnd)
        sub = folder / f"d{i % 7}"
        sub.mkdir(exist_ok=True)
        p = sub / f"{i:04d}"  # no suffix: the scan must not rely on names
        p.write_bytes(blob)
        written.append(str(p))
    (folder / "empty").write_bytes(b"")
    written.append(str(folder / "empty"))
    COUNTS["scan_files"] += len(written)

    catalog = scan(str(folder))
    assert sorted(catalog["url"]) == sorted(written)
    assert catalog["url"].is_unique
    for row in catalog.to_dict("records"):
        assert isinstance(row["read_error"], str)
    assert (catalog.loc[catalog["url"] == str(folder / "empty"), "read_error"].str.startswith("not DICOM")).all()
    for _, rows in catalog[catalog["read_error"] == ""].groupby("series_uid"):
        stacks_from_catalog(rows)
    plan = make_plan(catalog, Config(), b"fuzz-key")
    assert plan is not None


def test_object_storage_scan_of_mutated_files_equals_the_local_scan(seeds, s3, tmp_path):
    """The ranged, multi-round reads on object storage reach the same verdict as local reads, file by file."""
    from .conftest import upload_tree

    rnd = random.Random(99)
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(120):
        seed = rnd.choice(seeds)
        blob, _ = mutate(seed, rnd.choice(KINDS), rnd)
        (folder / f"f{i:03d}").write_bytes(blob)
    COUNTS["s3_scan_files"] += 120
    local = scan(str(folder))
    remote = scan(upload_tree(str(folder), s3, "fuzz"), storage_options=s3.storage_options)
    assert len(remote) == len(local) == 120
    local["name"] = local["url"].map(lambda u: u.rsplit("/", 1)[-1])
    remote["name"] = remote["url"].map(lambda u: u.rsplit("/", 1)[-1])
    cols = [c for c in CATALOG_COLUMNS if c != "url"]
    a = local.set_index("name")[cols].sort_index()
    b = remote.set_index("name")[cols].sort_index()
    for name in a.index:
        for col in cols:
            x, y = a.at[name, col], b.at[name, col]
            same = (x is None and y is None) or (isinstance(x, float) and isinstance(y, float) and math.isnan(x)
                                                  and math.isnan(y)) or str(x) == str(y)
            assert same, (name, col, x, y)
