"""C-FIND SCP (Patient Root and Study Root) on archive.query."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterator

from archive.query import QueryError, Searcher

from .contexts import FIND_MODELS
from .identifiers import keys_from_identifier, response_dataset

if TYPE_CHECKING:
    from archive.store import Archive

log = logging.getLogger("pathpacs.dimse.find")
IDENTIFIER_MISMATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000


def query_level(identifier, model_root: str) -> str:
    level = str(identifier.get("QueryRetrieveLevel", "")).upper()
    allowed = ("PATIENT", "STUDY", "SERIES", "IMAGE") if model_root == "PATIENT" else ("STUDY", "SERIES", "IMAGE")
    if level not in allowed:
        raise QueryError(f"invalid Query/Retrieve Level {level!r} for the {model_root} root model")
    return level


def handle_find(event, arc: "Archive") -> Iterator:
    try:
        identifier = event.identifier
        level = query_level(identifier, FIND_MODELS[str(event.request.AffectedSOPClassUID)])
        keys = keys_from_identifier(identifier)
        results = Searcher(arc.index, retrieve_aet=arc.config.aet).search(level, keys)
        first = next(results, None)
    except QueryError as exc:
        log.warning("C-FIND refused: %s", exc)
        yield IDENTIFIER_MISMATCH if "Level" in str(exc) else UNABLE_TO_PROCESS, None
        return
    except Exception as exc:
        log.warning("C-FIND failed: %s", exc)
        yield UNABLE_TO_PROCESS, None
        return
    if first is None:
        return
    for result in _chain(first, results):
        if event.is_cancelled:
            yield 0xFE00, None
            return
        yield 0xFF00, response_dataset(result.doc, identifier, level, arc.config.aet)


def _chain(first, rest):
    yield first
    yield from rest
