"""C-STORE SCP: the received file (pynetdicom writes it in chunks into our session tmp dir)
is handed to the one ingest function, which answers with the DIMSE status."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from archive.store import Archive


def handle_store(event, arc: "Archive") -> int:
    result = arc.ingest_file(
        event.dataset_path,
        take_ownership=True,
        source="c-store",
        calling_aet=event.assoc.requestor.ae_title,
        expected_sop_class=str(event.request.AffectedSOPClassUID),
    )
    return result.dimse_status
