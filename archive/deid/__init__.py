"""De-identification (PS3.15 Annex E) for consultations, research views and exports.

`Deidentifier(options, uids)` makes de-identified copies (`dataset`, `json`, the streamed
`instance_chunks`), `excluded` says which instances stay out (LABEL, OVERVIEW), `UidMap` keeps
original <-> new UIDs per context in the index, `DeidOptions` is the profile and its options.
"""
from .deidentifier import DeidError, Deidentifier
from .options import DeidOptions
from .uidmap import UidMap

__all__ = ["Deidentifier", "DeidOptions", "UidMap", "DeidError"]
