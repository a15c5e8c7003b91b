"""DICOM objects as a scanner writes them: MR and CT image storage, enhanced MR, a basic text SR, a secondary
capture, an RT structure set, and the tags that tell the volumes of a 4D MR series apart (time, diffusion; standard
or under a vendor's private creator).

Everything here is pure: plain values in, ``pydicom.Dataset`` / bytes out. Deterministic given its inputs
(no clocks, no random UIDs), so the same seed gives byte-identical files.
"""

from __future__ import annotations

import io
import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4")
ENHANCED_MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4.1")
CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
BASIC_TEXT_SR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.88.11")
SECONDARY_CAPTURE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7")
RT_STRUCTURE_SET_STORAGE = UID("1.2.840.10008.5.1.4.1.1.481.3")
IMPLEMENTATION_UID = UID("1.2.826.0.1.3680043.8.498.1")  # pydicom's root: a writer's implementation class
IMPLEMENTATION_VERSION = "MRICT_SYNTH_1"


def make_uid(*parts: Any) -> UID:
    """A valid, deterministic UID from the given parts (the same parts always give the same UID)."""
    return generate_uid(entropy_srcs=["mrict-dask-synth", *[str(p) for p in parts]])


@dataclass
class PatientInfo:
    patient_id: str
    name: str
    birth_date: str
    sex: str


@dataclass
class StudyInfo:
    uid: str
    modality: str
    date: str  # YYYYMMDD
    time: str  # HHMMSS
    accession: str
    description: str
    study_id: str
    institution: str
    referring: str
    manufacturer: str
    model: str
    station: str
    frame_uid: str
    age: str  # e.g. "063Y"


@dataclass
class SeriesInfo:
    uid: str
    number: int
    description: str
    role: str
    time: str
    image_type: list[str]
    protocol: dict = field(default_factory=dict)  # acquisition parameters (TR, TE, kernel, ...)


def _fmt(v: float) -> str:
    """A DS value within 16 characters, without float noise."""
    s = f"{v:.6f}".rstrip("0").rstrip(".")
    if s in ("-0", ""):
        s = "0"
    return s[:16]


def _ds_list(values) -> list[str]:
    return [_fmt(float(v)) for v in values]


def _common(ds: Dataset, patient: PatientInfo, study: StudyInfo, series: SeriesInfo, modality: str) -> None:
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyDate = study.date
    ds.SeriesDate = study.date
    ds.AcquisitionDate = study.date
    ds.ContentDate = study.date
    ds.StudyTime = study.time
    ds.SeriesTime = series.time
    ds.AcquisitionTime = series.time
    ds.ContentTime = series.time
    ds.AccessionNumber = study.accession
    ds.Modality = modality
    ds.Manufacturer = study.manufacturer
    ds.InstitutionName = study.institution
    ds.ReferringPhysicianName = study.referring
    ds.StationName = study.station
    ds.StudyDescription = study.description
    ds.SeriesDescription = series.description
    ds.ManufacturerModelName = study.model
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.PatientAge = study.age
    ds.StudyInstanceUID = study.uid
    ds.SeriesInstanceUID = series.uid
    ds.StudyID = study.study_id
    ds.SeriesNumber = series.number


def _file_meta(ds: Dataset, transfer_syntax: UID) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    ds.file_meta = meta


def _pixel_format(ds: Dataset, rows_cols: tuple[int, int], signed: bool, bits_stored: int) -> None:
    rows, cols = rows_cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = int(rows)
    ds.Columns = int(cols)
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0


def _plane(ds: Dataset, row: np.ndarray, col: np.ndarray, pixel_spacing: tuple[float, float],
           thickness: float) -> None:
    ds.ImageOrientationPatient = _ds_list(list(row) + list(col))
    ds.PixelSpacing = _ds_list(pixel_spacing)  # (row spacing = between rows, column spacing)
    ds.SliceThickness = _fmt(thickness)


PER_SLICE = ("SOPInstanceUID", "InstanceNumber", "ImagePositionPatient", "SliceLocation", "PixelData")


def slice_dataset(header: Dataset, *, sop_uid: str, instance: int, position: np.ndarray,
                  pixels: np.ndarray, transfer_syntax: UID = ExplicitVRLittleEndian) -> Dataset:
    """One image of a series: the series header plus what differs per slice (the header is not modified)."""
    ds = Dataset(dict(header._dict))
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = _ds_list(position)
    row = np.array([float(v) for v in header.ImageOrientationPatient[:3]])
    col = np.array([float(v) for v in header.ImageOrientationPatient[3:]])
    ds.SliceLocation = _fmt(float(np.dot(position, np.cross(row, col))))
    signed = header.PixelRepresentation == 1
    ds.add_new(0x7FE00010, "OW", np.ascontiguousarray(pixels.astype("<i2" if signed else "<u2")).tobytes())
    _file_meta(ds, transfer_syntax)
    return ds


def mr_image(patient: PatientInfo, study: StudyInfo, series: SeriesInfo, *, sop_uid: str, instance: int,
             pixels: np.ndarray, row: np.ndarray, col: np.ndarray, position: np.ndarray,
             pixel_spacing: tuple[float, float], thickness: float, spacing_between: float | None,
             window: tuple[float, float]) -> Dataset:
    header = mr_header(patient, study, series, rows_cols=pixels.shape[-2:], row=row, col=col,
                       pixel_spacing=pixel_spacing, thickness=thickness, spacing_between=spacing_between,
                       window=window)
    return slice_dataset(header, sop_uid=sop_uid, instance=instance, position=position, pixels=pixels)


def mr_header(patient: PatientInfo, study: StudyInfo, series: SeriesInfo, *, rows_cols: tuple[int, int],
              row: np.ndarray, col: np.ndarray, pixel_spacing: tuple[float, float], thickness: float,
              spacing_between: float | None, window: tuple[float, float]) -> Dataset:
    """Everything of an MR Image Storage object that is the same for each slice of the series."""
    p = series.protocol
    ds = Dataset()
    _common(ds, patient, study, series, "MR")
    ds.SOPClassUID = MR_IMAGE_STORAGE
    ds.ImageType = series.image_type
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = study.frame_uid
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition = "HFS"
    body_part = p.get("body_part", "HEAD")
    if body_part is not None:  # None: the element is absent, as some exports leave it
        ds.BodyPartExamined = body_part
    if not body_part:  # the body part might be a paired one: laterality is then required, if empty
        ds.Laterality = ""
    ds.ScanningSequence = p["scanning_sequence"]
    ds.SequenceVariant = p["sequence_variant"]
    ds.ScanOptions = p.get("scan_options", "")
    ds.MRAcquisitionType = p["acquisition_type"]
    ds.SequenceName = p.get("sequence_name", "")
    ds.RepetitionTime = _fmt(p["tr"])
    ds.EchoTime = _fmt(p["te"])
    if "ti" in p:
        ds.InversionTime = _fmt(p["ti"])
    ds.EchoTrainLength = p.get("etl", 1)
    ds.NumberOfAverages = "1"
    ds.ImagingFrequency = p.get("frequency", "63.87")
    ds.ImagedNucleus = "1H"
    ds.MagneticFieldStrength = p.get("field", "1.5")
    ds.FlipAngle = _fmt(p.get("flip", 90))
    ds.PixelBandwidth = p.get("bandwidth", "244.14")
    ds.ReceiveCoilName = p.get("coil", "HEAD")
    ds.AcquisitionMatrix = p.get("acq_matrix", [0, 256, 224, 0])
    ds.InPlanePhaseEncodingDirection = "ROW"
    if spacing_between is not None:
        ds.SpacingBetweenSlices = _fmt(spacing_between)
    if p.get("contrast"):
        ds.ContrastBolusAgent = p["contrast"]
        ds.ContrastBolusRoute = "IV"
    _plane(ds, row, col, pixel_spacing, thickness)
    _pixel_format(ds, rows_cols, signed=False, bits_stored=12)
    ds.WindowCenter = _fmt(window[0])
    ds.WindowWidth = _fmt(window[1])
    return ds


def ct_image(patient: PatientInfo, study: StudyInfo, series: SeriesInfo, *, sop_uid: str, instance: int,
             pixels: np.ndarray, row: np.ndarray, col: np.ndarray, position: np.ndarray,
             pixel_spacing: tuple[float, float], thickness: float, window: tuple[float, float],
             intercept: float, padding: int | None, tilt: float = 0.0) -> Dataset:
    header = ct_header(patient, study, series, rows_cols=pixels.shape[-2:], row=row, col=col,
                       pixel_spacing=pixel_spacing, thickness=thickness, window=window, intercept=intercept,
                       padding=padding, tilt=tilt)
    return slice_dataset(header, sop_uid=sop_uid, instance=instance, position=position, pixels=pixels)


def ct_header(patient: PatientInfo, study: StudyInfo, series: SeriesInfo, *, rows_cols: tuple[int, int],
              row: np.ndarray, col: np.ndarray, pixel_spacing: tuple[float, float], thickness: float,
              window: tuple[float, float], intercept: float, padding: int | None, tilt: float = 0.0,
              spacing_between: float | None = None) -> Dataset:
    """Everything of a CT Image Storage object that is the same for each slice of the series."""
    p = series.protocol
    ds = Dataset()
    _common(ds, patient, study, series, "CT")
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.ImageType = series.image_type
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = study.frame_uid
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition = "HFS"
    ds.BodyPartExamined = "HEAD"
    ds.KVP = _fmt(p.get("kvp", 120))
    ds.DataCollectionDiameter = "500"
    ds.ReconstructionDiameter = _fmt(p["recon_diameter"])
    ds.GantryDetectorTilt = _fmt(tilt)
    ds.TableHeight = "160"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "1000"
    ds.XRayTubeCurrent = "250"
    ds.ConvolutionKernel = p.get("kernel", "STANDARD")
    ds.FilterType = "HEAD FILTER"
    if spacing_between is not None:
        ds.SpacingBetweenSlices = _fmt(spacing_between)
    _plane(ds, row, col, pixel_spacing, thickness)
    _pixel_format(ds, rows_cols, signed=True, bits_stored=16)
    if padding is not None:
        ds.PixelPaddingValue = int(padding)
    ds.RescaleIntercept = _fmt(intercept)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = _fmt(window[0])
    ds.WindowWidth = _fmt(window[1])
    return ds


class SeriesEncoder:
    """Fast Part 10 bytes for the slices of one series: the shared header is encoded once, in the segments
    between the per-slice elements, so a slice costs only its own few elements. Output equals ``encode(ds)``."""

    def __init__(self, header: Dataset):
        from pydicom.filewriter import write_dataset
        from pydicom.tag import Tag

        self._tags = sorted(Tag(kw) for kw in PER_SLICE)
        edges = [-1, *self._tags, 0x100000000]
        self._segments = []
        for lo, hi in itertools.pairwise(edges):
            sub = Dataset({t: e for t, e in header._dict.items() if lo < t < hi})
            fp = _buffer()
            write_dataset(fp, sub, parent_encoding=_charset(header))
            self._segments.append(fp.getvalue())
        self._charset = _charset(header)

    def encode(self, ds: Dataset) -> bytes:
        from pydicom.filewriter import write_data_element, write_file_meta_info

        fp = _buffer()
        fp.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(fp, ds.file_meta, enforce_standard=True)
        for segment, tag in zip(self._segments, self._tags):
            fp.write(segment)
            write_data_element(fp, ds[tag], self._charset)
        fp.write(self._segments[-1])
        return fp.getvalue()


def _buffer():
    from pydicom.filebase import DicomBytesIO

    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    return fp


def _charset(ds: Dataset):
    from pydicom.charset import convert_encodings

    return convert_encodings(ds.get("SpecificCharacterSet", "ISO_IR 6"))


def encode(ds: Dataset, transfer_syntax: UID | None = None) -> bytes:
    """The DICOM Part 10 file bytes; optionally re-encoded to a lossless compressed transfer syntax."""
    if transfer_syntax is not None and transfer_syntax != ds.file_meta.TransferSyntaxUID:
        if transfer_syntax in (RLELossless, JPEG2000Lossless):
            # keep the SOP Instance UID: pydicom would draw a new, random one (the same seed must give the same bytes)
            ds.compress(transfer_syntax, encoding_plugin="pylibjpeg", generate_instance_uid=False)
        else:  # pragma: no cover - programming error
            raise ValueError(f"unsupported transfer syntax {transfer_syntax}")
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def text_sr(patient: PatientInfo, study: StudyInfo, series: SeriesInfo, *, sop_uid: str, text: str) -> Dataset:
    """A minimal Basic Text SR (e.g. a dose summary) in the CT study: a non-image object."""
    ds = Dataset()
    _common(ds, patient, study, series, "SR")
    ds.SOPClassUID = BASIC_TEXT_SR_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = 1
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    title = Dataset()
    title.CodeValue = "121118"
    title.CodingSchemeDesignator = "DCM"
    title.CodeMeaning = "Patient History"
    ds.ConceptNameCodeSequence = DicomSequence([title])
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    name = Dataset()
    name.CodeValue = "121106"
    name.CodingSchemeDesignator = "DCM"
    name.CodeMeaning = "Comment"
    item.ConceptNameCodeSequence = DicomSequence([name])
    item.TextValue = text
    ds.ContentSequence = DicomSequence([item])
    ds.PerformedProcedureCodeSequence = DicomSequence([])
    ds.ReferencedPerformedProcedureStepSequence = DicomSequence([])
    del ds.SeriesDate, ds.AcquisitionDate, ds.AcquisitionTime
    _file_meta(ds, ExplicitVRLittleEndian)
    return ds


def _item(**kw) -> Dataset:
    ds = Dataset()
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    return _item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


def enhanced_mr(patient: PatientInfo, study: StudyInfo, series: SeriesInfo, *, sop_uid: str, volume: np.ndarray,
                geometry, thickness: float, spacing_between: float | None, window: tuple[float, float]) -> Dataset:
    """A whole MR volume as one Enhanced MR Image Storage object (multi-frame, functional groups)."""
    p = series.protocol
    n, rows, cols = volume.shape
    row, col = geometry.axes[:, 0], geometry.axes[:, 1]
    ds = Dataset()
    _common(ds, patient, study, series, "MR")
    for kw in ("AcquisitionDate", "AcquisitionTime", "SeriesDate"):
        delattr(ds, kw)
    ds.SOPClassUID = ENHANCED_MR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.FrameOfReferenceUID = study.frame_uid
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition = "HFS"
    ds.BodyPartExamined = "HEAD"
    ds.DeviceSerialNumber = "SN" + study.station
    ds.SoftwareVersions = "synth-1"
    ds.AcquisitionDateTime = study.date + series.time
    ds.AcquisitionDuration = 312.0
    ds.ContentQualification = "PRODUCT"
    ds.ResonantNucleus = "1H"
    ds.KSpaceFiltering = "NONE"
    ds.MagneticFieldStrength = "1.5"
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.ImageComments = ""
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = "T1"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.AcquisitionContextSequence = DicomSequence([])
    # MR Pulse Sequence module
    ds.PulseSequenceName = p.get("sequence_name", "")
    ds.MRAcquisitionType = p["acquisition_type"]
    ds.EchoPulseSequence = "GRADIENT" if "GR" in p["scanning_sequence"] else "SPIN"
    if ds.EchoPulseSequence != "GRADIENT":
        ds.MultipleSpinEcho = "NO"
    ds.MultiPlanarExcitation = "NO"
    ds.PhaseContrast = "NO"
    ds.TimeOfFlightContrast = "NO"
    ds.SteadyStatePulseSequence = "NONE"
    ds.EchoPlanarPulseSequence = "NO"
    ds.SaturationRecovery = "NO"
    ds.SpectrallySelectedSuppression = "NONE"
    ds.OversamplingPhase = "NONE"
    ds.GeometryOfKSpaceTraversal = "RECTILINEAR"
    ds.RectilinearPhaseEncodeReordering = "LINEAR"
    ds.SegmentedKSpaceTraversal = "SINGLE"
    ds.CoverageOfKSpace = "FULL"
    ds.NumberOfKSpaceTrajectories = 1
    if p.get("contrast"):
        agent = _code("C-17800", "SRT", "Gadolinium")
        for kw, v in dict(ContrastBolusAgentNumber=1, ContrastBolusVolume=15.0,
                          ContrastBolusIngredientConcentration=0.5).items():
            setattr(agent, kw, v)
        agent.ContrastBolusAdministrationRouteSequence = DicomSequence([_code("G-D101", "SRT", "Intravenous route")])
        agent.ContrastBolusIngredientCodeSequence = DicomSequence([_code("C-17800", "SRT", "Gadolinium")])
        ds.ContrastBolusAgentSequence = DicomSequence([agent])
    _pixel_format(ds, (rows, cols), signed=False, bits_stored=12)
    ds.NumberOfFrames = n
    ds.ContentDate = study.date
    ds.ContentTime = series.time
    dim_uid = make_uid(sop_uid, "dimension")
    ds.DimensionOrganizationSequence = DicomSequence([_item(DimensionOrganizationUID=dim_uid)])
    ds.DimensionOrganizationType = "3D"
    ds.DimensionIndexSequence = DicomSequence([
        _item(DimensionOrganizationUID=dim_uid, DimensionIndexPointer=0x00209056,
              FunctionalGroupPointer=0x00209111, DimensionDescriptionLabel="Stack ID"),
        _item(DimensionOrganizationUID=dim_uid, DimensionIndexPointer=0x00209057,
              FunctionalGroupPointer=0x00209111, DimensionDescriptionLabel="In-Stack Position Number"),
    ])
    measures = _item(PixelSpacing=_ds_list((geometry.spacing[1], geometry.spacing[0])), SliceThickness=_fmt(thickness))
    if spacing_between is not None:
        measures.SpacingBetweenSlices = _fmt(spacing_between)
    shared = Dataset()
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PlaneOrientationSequence = DicomSequence([_item(ImageOrientationPatient=_ds_list(list(row) + list(col)))])
    shared.FrameVOILUTSequence = DicomSequence([_item(WindowCenter=_fmt(window[0]), WindowWidth=_fmt(window[1]))])
    shared.MRImageFrameTypeSequence = DicomSequence([_item(
        FrameType=["ORIGINAL", "PRIMARY", "VOLUME", "NONE"], PixelPresentation="MONOCHROME",
        VolumetricProperties="VOLUME", VolumeBasedCalculationTechnique="NONE", ComplexImageComponent="MAGNITUDE",
        AcquisitionContrast="T1")])
    shared.MRTimingAndRelatedParametersSequence = DicomSequence([_item(
        RepetitionTime=float(p["tr"]), FlipAngle=float(p.get("flip", 90)), EchoTrainLength=int(p.get("etl", 1)),
        RFEchoTrainLength=int(p.get("etl", 1)), GradientEchoTrainLength=0,
        GradientOutputType="DB_DT", GradientOutput=0.0,
        SpecificAbsorptionRateSequence=DicomSequence([_item(SpecificAbsorptionRateDefinition="IEC_WHOLE_BODY",
                                                            SpecificAbsorptionRateValue=0.5)]),
        OperatingModeSequence=DicomSequence([_item(OperatingModeType="STATIC FIELD", OperatingMode="IEC_NORMAL")]))])
    shared.MRFOVGeometrySequence = DicomSequence([_item(
        InPlanePhaseEncodingDirection="ROW", MRAcquisitionFrequencyEncodingSteps=cols,
        MRAcquisitionPhaseEncodingStepsInPlane=rows, MRAcquisitionPhaseEncodingStepsOutOfPlane=n,
        PercentSampling=100.0, PercentPhaseFieldOfView=100.0)])
    shared.MREchoSequence = DicomSequence([_item(EffectiveEchoTime=float(p["te"]))])
    modifier = _item(InversionRecovery="YES" if "ti" in p else "NO", FlowCompensation="NONE", T2Preparation="NO",
                     SpectrallySelectedExcitation="NONE", SpatialPresaturation="NONE", PartialFourier="NO",
                     ParallelAcquisition="NO")
    if "ti" in p:
        modifier.InversionTimes = [float(p["ti"])]
    shared.MRModifierSequence = DicomSequence([modifier])
    shared.MRImagingModifierSequence = DicomSequence([_item(
        PixelBandwidth=244.14, TransmitterFrequency=63.87, MagnetizationTransfer="NONE", BloodSignalNulling="NO",
        Tagging="NONE")])
    shared.MRReceiveCoilSequence = DicomSequence([_item(
        ReceiveCoilName="HEAD", ReceiveCoilManufacturerName=study.manufacturer, ReceiveCoilType="VOLUME",
        QuadratureReceiveCoil="YES")])
    shared.PixelValueTransformationSequence = DicomSequence([_item(RescaleIntercept="0", RescaleSlope="1",
                                                                   RescaleType="US")])
    if p.get("contrast"):
        shared.ContrastBolusUsageSequence = DicomSequence([_item(
            ContrastBolusAgentNumber=1, ContrastBolusAgentAdministered="YES", ContrastBolusAgentDetected="NO")])
    shared.MRTransmitCoilSequence = DicomSequence([_item(
        TransmitCoilName="BODY", TransmitCoilManufacturerName=study.manufacturer, TransmitCoilType="BODY")])
    shared.MRAveragesSequence = DicomSequence([_item(NumberOfAverages=1.0)])
    shared.FrameAnatomySequence = DicomSequence([_item(
        FrameLaterality="B", AnatomicRegionSequence=DicomSequence([_code("T-A0100", "SRT", "Brain")]))])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    for k in range(n):
        pos = geometry.physical([0, 0, k])
        f = Dataset()
        f.FrameContentSequence = DicomSequence([_item(
            StackID="1", InStackPositionNumber=k + 1, DimensionIndexValues=[1, k + 1],
            FrameAcquisitionDateTime=study.date + series.time, FrameReferenceDateTime=study.date + series.time,
            FrameAcquisitionDuration=1000.0)])
        f.PlanePositionSequence = DicomSequence([_item(ImagePositionPatient=_ds_list(pos))])
        frames.append(f)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    ds.PixelData = np.ascontiguousarray(volume.astype("<u2")).tobytes()
    _file_meta(ds, ExplicitVRLittleEndian)
    return ds


# ------------------------------------------------------------------------------------------------ 4D MR series
# How the volumes of one MR series are told apart, as vendors write it (classic single-frame MR Image Storage).
TEMPORAL_HABITS = ("temporal_position", "acquisition_number", "acquisition_time")
DIFFUSION_STYLES = ("standard", "siemens", "ge", "philips")


def tm(seconds_of_day: float) -> str:
    """A DICOM TM with microseconds (4D series stamp each volume within the same second)."""
    whole = int(seconds_of_day)
    micro = int(round((seconds_of_day - whole) * 1e6))
    if micro == 1_000_000:
        whole, micro = whole + 1, 0
    return f"{whole // 3600:02d}{whole // 60 % 60:02d}{whole % 60:02d}.{micro:06d}"


def set_temporal(ds: Dataset, habit: str, index: int, count: int, offset_s: float, start_s: float) -> None:
    """Mark one time point of a dynamic series: AcquisitionTime always; then the vendor's own habit, if any
    ("acquisition_time": nothing else; TriggerTime is for gated acquisitions only, which DSC is not)."""
    ds.AcquisitionTime = tm(start_s + offset_s)
    if habit == "temporal_position":
        ds.TemporalPositionIdentifier = index + 1
        ds.NumberOfTemporalPositions = count
    elif habit == "acquisition_number":
        ds.AcquisitionNumber = index + 1
    elif habit != "acquisition_time":  # pragma: no cover - programming error
        raise ValueError(habit)


def set_diffusion(ds: Dataset, style: str, b_value: float, direction: np.ndarray | None) -> None:
    """The b-value and gradient direction (patient LPS unit vector; None for b=0) of one diffusion volume."""
    b = int(round(b_value))
    g = None if direction is None else [float(v) for v in direction]
    if style == "standard":
        ds.add_new(0x00189087, "FD", float(b))  # DiffusionBValue
        if g is not None:
            ds.add_new(0x00189089, "FD", g)  # DiffusionGradientOrientation
    elif style == "siemens":
        block = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
        block.add_new(0x0C, "IS", str(b))  # B_value
        block.add_new(0x0D, "CS", "NONE" if g is None else "DIRECTIONAL")
        if g is not None:
            block.add_new(0x0E, "FD", g)  # DiffusionGradientDirection
    elif style == "ge":
        acq = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
        for element, v in zip((0xBB, 0xBC, 0xBD), g if g is not None else [0.0, 0.0, 0.0]):
            acq.add_new(element, "DS", _fmt(v))
        parm = ds.private_block(0x0043, "GEMS_PARM_01", create=True)
        parm.add_new(0x39, "IS", [str(b + 1_000_000_000), "8", "0", "0"])  # slop_int_6..9; +1e9: b set by the user
    elif style == "philips":
        ds.private_block(0x2001, "Philips Imaging DD 001", create=True).add_new(0x03, "FL", float(b))
        block = ds.private_block(0x2005, "Philips MR Imaging DD 001", create=True)
        for element, v in zip((0xB0, 0xB1, 0xB2), g if g is not None else [0.0, 0.0, 0.0]):
            block.add_new(element, "FL", float(v))
    else:  # pragma: no cover - programming error
        raise ValueError(style)


# ------------------------------------------------------------------------------------------------ non-volume objects
def secondary_capture(patient: PatientInfo, study: StudyInfo, series: SeriesInfo, *, sop_uid: str, rgb: np.ndarray,
                      modality: str) -> Dataset:
    """A workstation screenshot (RGB, no patient geometry) filed in an image study under that study's modality."""
    ds = Dataset()
    _common(ds, patient, study, series, modality)
    for kw in ("AcquisitionDate", "AcquisitionTime"):
        delattr(ds, kw)
    ds.SOPClassUID = SECONDARY_CAPTURE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = 1
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.ConversionType = "WSD"
    ds.Laterality = ""
    ds.PatientOrientation = ""
    ds.BurnedInAnnotation = "NO"
    ds.DateOfSecondaryCapture = study.date
    ds.TimeOfSecondaryCapture = series.time
    ds.SecondaryCaptureDeviceManufacturer = series.protocol.get("device", "")
    rows, cols, _ = rgb.shape
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows = int(rows)
    ds.Columns = int(cols)
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "00"
    ds.add_new(0x7FE00010, "OB", np.ascontiguousarray(rgb.astype(np.uint8)).tobytes())
    _file_meta(ds, ExplicitVRLittleEndian)
    return ds


@dataclass
class Contour:
    image_sop_uid: str  # the CT image whose plane holds the contour
    points: np.ndarray  # (n, 3) patient LPS mm


@dataclass
class Roi:
    number: int
    name: str
    interpreted_type: str  # e.g. GTV, EXTERNAL, ORGAN
    color: tuple[int, int, int]
    contours: list[Contour]


def rt_structure_set(patient: PatientInfo, study: StudyInfo, series: SeriesInfo, *, sop_uid: str, label: str,
                     referenced_series_uid: str, image_class: str, image_uids: list[str], rois: list[Roi]) -> Dataset:
    """A minimal RT Structure Set: closed planar contours on the images of one CT series (its frame of reference)."""
    ds = Dataset()
    _common(ds, patient, study, series, "RTSTRUCT")
    for kw in ("AcquisitionDate", "AcquisitionTime", "ContentDate", "ContentTime"):
        delattr(ds, kw)
    ds.FrameOfReferenceUID = study.frame_uid
    ds.PositionReferenceIndicator = ""
    p = series.protocol
    ds.Manufacturer = p.get("manufacturer", "")
    ds.ManufacturerModelName = p.get("model", "")
    ds.OperatorsName = ""
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = 1
    ds.StructureSetLabel = label
    ds.StructureSetName = label
    ds.StructureSetDate = study.date
    ds.StructureSetTime = series.time
    contour_images = [_item(ReferencedSOPClassUID=image_class, ReferencedSOPInstanceUID=u) for u in image_uids]
    ref_series = _item(SeriesInstanceUID=referenced_series_uid, ContourImageSequence=DicomSequence(contour_images))
    # the referenced study by its Study Component Management SOP class, as RT systems write it
    ref_study = _item(ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1", ReferencedSOPInstanceUID=study.uid,
                      RTReferencedSeriesSequence=DicomSequence([ref_series]))
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([_item(
        FrameOfReferenceUID=study.frame_uid, RTReferencedStudySequence=DicomSequence([ref_study]))])
    ds.StructureSetROISequence = DicomSequence([_item(
        ROINumber=r.number, ReferencedFrameOfReferenceUID=study.frame_uid, ROIName=r.name,
        ROIGenerationAlgorithm="MANUAL") for r in rois])
    contour_seqs = []
    for r in rois:
        contours = []
        for n, c in enumerate(r.contours, start=1):
            item = _item(ContourImageSequence=DicomSequence([_item(ReferencedSOPClassUID=image_class,
                                                                   ReferencedSOPInstanceUID=c.image_sop_uid)]),
                         ContourGeometricType="CLOSED_PLANAR", NumberOfContourPoints=len(c.points), ContourNumber=n)
            item.ContourData = [_fmt(round(float(v), 3)) for v in np.asarray(c.points).ravel()]
            contours.append(item)
        contour_seqs.append(_item(ReferencedROINumber=r.number, ROIDisplayColor=list(r.color),
                                  ContourSequence=DicomSequence(contours)))
    ds.ROIContourSequence = DicomSequence(contour_seqs)
    ds.RTROIObservationsSequence = DicomSequence([_item(
        ObservationNumber=r.number, ReferencedROINumber=r.number, RTROIInterpretedType=r.interpreted_type,
        ROIInterpreter="") for r in rois])
    ds.ApprovalStatus = "UNAPPROVED"
    _file_meta(ds, ExplicitVRLittleEndian)
    return ds
