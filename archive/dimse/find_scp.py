"""C-FIND SCP (Patient Root and Study Root) on archive.query."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterator

from archive.query import QueryError
from archive.status import DimseStatus, ErrorKind

from .caller import caller
from .admission import principal_of_association
from .contexts import FIND_MODELS
from .identifiers import keys_from_identifier, response_dataset

if TYPE_CHECKING:
    from archive.service import Archive

log = logging.getLogger("pathpacs.dimse.find")


def query_level(identifier, model_root: str) -> str:
    level = str(identifier.get("QueryRetrieveLevel", "")).upper()
    allowed = ("PATIENT", "STUDY", "SERIES", "IMAGE") if model_root == "PATIENT" else ("STUDY", "SERIES", "IMAGE")
    if level not in allowed:
        raise QueryError(f"invalid Query/Retrieve Level {level[:20]!r} for the {model_root} root model",
                         kind=ErrorKind.LEVEL)
    return level


def refusal_status(exc: QueryError) -> DimseStatus:
    """PS3.4 C.4.1.1.4: a level the model does not have is "Identifier does not match SOP
    Class" (0xA900); any other bad key is "Unable to process" (0xC000)."""
    return DimseStatus.DATASET_MISMATCH if exc.kind is ErrorKind.LEVEL else DimseStatus.CANNOT_UNDERSTAND


def handle_find(event, arc: "Archive") -> Iterator:
    """The C-FIND answers, audited once the search ends (or fails, or is cancelled)."""
    state = {"n": 0, "level": "", "keys": "", "outcome": "success", "reason": "", "study": None}
    try:
        yield from _find(event, arc, state)
    finally:
        who, address, aet, _ = caller(event)
        arc.audit.queried(who, state["level"], state["keys"], address, aet, state["n"], study=state["study"],
                          model=str(event.context.abstract_syntax), outcome=state["outcome"],
                          reason=state["reason"], via="C-FIND")


def _find(event, arc: "Archive", state: dict) -> Iterator:
    try:
        identifier = event.identifier
        level = query_level(identifier, FIND_MODELS[str(event.context.abstract_syntax)])
        state["level"] = level
        keys = keys_from_identifier(identifier)
        state["keys"] = keys_text(keys)
        state["study"] = next((k.values[0] for k in keys if k.tag == "0020000D" and k.values
                               and len(k.values) == 1), None)
        results = arc.search(level, keys, retrieve_aet=arc.config.aet, who=principal_of_association(event.assoc))
        first = next(results, None)
    except QueryError as exc:
        log.warning("C-FIND refused: %s", exc)
        state["outcome"], state["reason"] = "minor failure", str(exc)
        yield refusal_status(exc), None
        return
    except Exception as exc:
        log.warning("C-FIND failed: %s", exc)
        state["outcome"], state["reason"] = "serious failure", str(exc)[:200]
        yield DimseStatus.CANNOT_UNDERSTAND, None
        return
    if first is None:
        return
    for result in _chain(first, results):
        if event.is_cancelled:
            yield DimseStatus.CANCEL, None
            return
        state["n"] += 1
        yield DimseStatus.PENDING, response_dataset(result.doc, identifier, level, arc.config.aet)


def keys_text(keys) -> str:
    """The matching keys of a query as text (audit ParticipantObjectQuery): TAG=VALUE ..."""
    sep = "\\"
    return " ".join(k.tag + "=" + sep.join(str(v) for v in k.values) for k in keys if k.values)[:4096]


def _chain(first, rest):
    yield first
    yield from rest
