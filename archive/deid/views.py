"""Research views: what a de-identified principal (`Principal.deidentified`) reads.

`Archive.view(who)` is the one question the read paths ask: None for everyone else, else this
object, which turns what they would return into its de-identified form: DICOM JSON (metadata,
query results), whole instances (streamed, pixel data as stored), and hides LABEL and
OVERVIEW images and whatever the profile cannot de-identify (burned-in annotation, unknown
SOP classes) as if they did not exist. Frames are served unchanged.

UIDs are retained in research views (Retain UIDs Option, 113110, recorded in the objects):
the study, series and instance UIDs are this archive's keys, so a research token browses,
opens slides in the viewer and follows references exactly as a clinical one does, and no map
has to translate every request and every reference on the way in and out. What the UIDs could
disclose is only a link back to the identified record inside this archive, which the research
principal cannot read. Sends and exports to other parties replace UIDs (UidMap per context).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterator

from ..query import Key, QueryError
from ..metadata import header_dataset
from .deidentifier import DeidError, Deidentifier
from .options import DeidOptions
from .uidmap import UidMap

CONTEXT = "research"
# What a research query may match on: keys whose values the view shows as stored (UIDs,
# modality, classes). Matching on anything the profile removes or replaces would disclose it.
MATCHABLE = frozenset({"0020000D", "0020000E", "00080018", "00080060", "00080061", "00080016", "00080062",
                       "00200011", "00200013", "00080008"})


class ResearchView:
    """De-identified views for `Archive` (built lazily, one per archive)."""

    def __init__(self, archive) -> None:
        self.archive = archive
        options = DeidOptions.from_config(archive.config).replace(retain_uids=True, keep_label=False,
                                                                   keep_overview=False)
        self.deid = Deidentifier(options, UidMap(archive.index, CONTEXT))
        self._hidden: dict[str, bool] = {}

    # -- what is hidden ----------------------------------------------------------------------
    def hidden(self, rec) -> bool:
        """Whether an instance does not exist for a research principal."""
        if rec is None:
            return True
        got = self._hidden.get(rec.sop)
        if got is None:
            got = self.deid.excluded(rec) is not None or self._cannot(rec)
            if len(self._hidden) > 200_000:
                self._hidden.clear()
            self._hidden[rec.sop] = got
        return got

    def _cannot(self, rec) -> bool:
        meta = self.archive.instance_metadata(rec)
        if meta is None:
            return True
        try:
            self.deid.check(header_dataset(meta))
        except DeidError:
            return True
        return False

    def visible(self, recs: list) -> list:
        return [r for r in recs if not self.hidden(r)]

    # -- DICOM JSON ------------------------------------------------------------------------
    def doc(self, doc: dict[str, Any]) -> dict[str, Any]:
        """One DICOM JSON object de-identified (query results and upper-level attributes)."""
        return self.deid.json(doc, check=False)

    def metadata(self, metas: list[bytes]) -> list[bytes]:
        """Stored instance metadata de-identified; instances the view hides are left out."""
        import json

        from .. import metadata as md

        out = []
        for m in metas:
            doc = json.loads(m)
            if self.deid.excluded(doc) is not None:
                continue
            try:
                out.append(md.dumps(self.deid.json(doc)))
            except DeidError:
                continue
        return out

    def check_query(self, keys: list[Key]) -> None:
        """QueryError for a key a research view may not match on."""
        for k in keys:
            if not k.universal and k.tag not in MATCHABLE:
                from pydicom.datadict import keyword_for_tag

                name = keyword_for_tag(int(k.tag, 16)) or k.tag
                raise QueryError(f"a de-identified view cannot match on {name}")

    def results(self, results: Iterator) -> Iterator:
        for r in results:
            if r.level == "IMAGE" and self.hidden(self.archive.instance(r.sop)):
                continue
            try:
                yield replace(r, doc=self.doc(r.doc))
            except DeidError:
                continue  # what cannot be de-identified is not answered

    def bulk_allowed(self, study: str, series: str, sop: str, path: str) -> bool:
        """Whether a bulk value is still in the instance's de-identified metadata."""
        metas = self.metadata(self.archive.index.metadata([sop]))
        if not metas:
            return False
        import json

        return any(uri.endswith(f"/instances/{sop}/bulkdata/{path}")
                   for uri in self.deid.walk_json_uris(json.loads(metas[0])))

    # -- instances ---------------------------------------------------------------------------
    def chunks(self, rec) -> Iterator[bytes]:
        from ..status import NotFound

        try:
            yield from self.deid.instance_chunks(self.archive, rec)
        except DeidError as exc:  # hidden() let it through, yet it cannot be de-identified
            raise NotFound(f"instance {rec.sop} not found") from exc

    def dataset(self, ds):
        return self.deid.dataset(ds)
