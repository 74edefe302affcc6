// The consultation inbox on the study browser (issue 12): received cases from
// /api/consult/inbox, each opening the viewer on its study with the consultation panel.
// Uses browser.js's globals ($, t, auth); shown once the search form is (after login).
"use strict";
(() => {
  const section = document.createElement("section");
  section.id = "inbox";
  section.hidden = true;
  section.innerHTML = '<h2 data-t=inbox></h2><table><thead><tr><th data-t=inbox_received></th>' +
    '<th data-t=inbox_from></th><th data-t=inbox_priority></th><th data-t=inbox_question></th>' +
    '<th data-t=inbox_state></th><th></th></tr></thead><tbody></tbody></table>';
  $("pager").after(section);  // after the studies (whose table stays the page's first)
  for (const el of section.querySelectorAll("[data-t]")) el.textContent = t(el.dataset.t);

  async function load() {
    const r = await fetch("api/consult/inbox", {headers: auth()});
    if (!r.ok) { section.hidden = true; return; }
    const cases = await r.json();
    const body = section.querySelector("tbody");
    body.replaceChildren();
    for (const c of cases) {
      const row = body.insertRow();
      row.dataset.case = c.id;
      row.className = c.priority === "frozen" || c.priority === "urgent" ? "urgent" : "";
      cell(row, (c.received || "").replace("T", " ").slice(0, 16));
      cell(row, c.partner || (c.requester + " (" + t("inbox_unknown") + ")"));
      cell(row, c.priority || "");
      cell(row, c.question || "");
      cell(row, c.state || "");
      const a = document.createElement("a");
      a.href = "viewer?study=" + encodeURIComponent(c.study) + "&consult=" + encodeURIComponent(c.id);
      a.textContent = t("open");
      a.dataset.t = "open";
      row.insertCell().append(a);
    }
    section.hidden = !cases.length;
  }
  new MutationObserver(() => { if (!$("search").hidden) load().catch(() => {}); })
    .observe($("search"), {attributes: true, attributeFilter: ["hidden"]});
  $("lang").addEventListener("change", () => {
    for (const el of section.querySelectorAll("[data-t]")) el.textContent = t(el.dataset.t);
  });
})();
