"""Imaging: DICOM or PNG bytes → a validated, display-oriented `Radiograph`, or a coded refusal.

Header checks, the decoders with their killable process pool, grey scale (modality, VOI, inversion), the
acceptance rules, UID syntax. Imports only the foundation (`service.settings`, `errors`, `processes`).
"""
