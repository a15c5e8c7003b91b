"""Synthetic brain MR + CT DICOM corpora with ground truth (transforms, pairs, exclusions, planted PHI).

``generate_corpus`` writes DICOM and a manifest; ``simulate_patient`` gives the same anatomy in memory.
"""

from .corpus import (
    QUIRKS,
    SimPatient,
    SynthSummary,
    generate_corpus,
    parse_quirks,
    patient_seed,
    simulate_patient,
)

__all__ = ["QUIRKS", "SimPatient", "SynthSummary", "generate_corpus", "parse_quirks", "patient_seed",
           "simulate_patient"]
