"""Cross-hospital consultation (issue 12): partners, sending a case, the request and opinion as
DICOM structured reports, the inbox of received requests, and the per-partner report.

The request and the opinion travel as Comprehensive SR documents (highdicom), so a partner
running any DICOM archive receives them in a standard form; `codes` is the one place that
names their concepts.
"""
