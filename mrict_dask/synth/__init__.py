"""Synthetic brain MR + CT DICOM corpora with ground truth (transforms, pairs, exclusions, planted PHI).

``generate_corpus`` writes DICOM and a manifest; ``simulate_patient`` gives the same anatomy in memory.
``QUIRKS`` break files (missing slices, compression, ...); ``LAYOUT_QUIRKS`` arrange sessions as real clinical
exports do (layouts.py).
"""

from .corpus import (
    LAYOUT_QUIRKS,
    QUIRKS,
    SimPatient,
    SynthSummary,
    generate_corpus,
    parse_quirks,
    patient_seed,
    simulate_patient,
)

__all__ = ["LAYOUT_QUIRKS", "QUIRKS", "SimPatient", "SynthSummary", "generate_corpus", "parse_quirks", "patient_seed",
           "simulate_patient"]
