"""Synthetic brain MR + CT DICOM corpora with ground truth (transforms, pairs, exclusions, planted PHI).

``generate_corpus`` writes DICOM and a manifest; ``simulate_patient`` gives the same anatomy in memory.
``QUIRKS`` break files (missing slices, compression, ...); ``LAYOUT_QUIRKS`` arrange sessions as real clinical
exports do and take fields of view as scanners do (layouts.py). The heads are whole heads (head.py: face, ears, neck,
shoulders); ``points`` maps their face landmarks and deep-brain points into any series.
"""

from .corpus import (
    LAYOUT_QUIRKS,
    QUIRKS,
    SimPatient,
    SynthSummary,
    parse_quirks,
    patient_seed,
    simulate_patient,
)
from .generate import generate_corpus

__all__ = ["LAYOUT_QUIRKS", "QUIRKS", "SimPatient", "SynthSummary", "generate_corpus", "parse_quirks", "patient_seed",
           "simulate_patient"]
