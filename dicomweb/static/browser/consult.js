// "Send for consultation" on a study of the study browser (issue 12): a button in each row when
// the archive has partners, a dialog (partner, expert, priority, question, physician,
// de-identify) that POSTs api/consult/send, then the job's progress from api/consult/jobs/ID.
// Loaded after browser.js and uses its globals ($, auth, lang); its own words in both languages.
"use strict";
(() => {
  const WORDS = {
    en: {send: "Send for consultation", partner: "Partner", expert: "Expert", any_expert: "(any)",
         priority: "Priority", routine: "routine", urgent: "urgent", frozen: "frozen section",
         question: "Clinical question", physician: "Requesting physician", deidentify: "De-identify",
         go: "Send", cancel: "Cancel", queued: "Job {id} queued", state: "Job {id}: {state}, {sent}/{total} instances",
         refused: "Refused"},
    "zh-CN": {send: "发送会诊", partner: "会诊医院", expert: "会诊专家", any_expert: "(不指定)",
              priority: "优先级", routine: "常规", urgent: "加急", frozen: "术中冰冻",
              question: "临床问题", physician: "申请医生", deidentify: "去标识化",
              go: "发送", cancel: "取消", queued: "任务 {id} 已排队", state: "任务 {id}:{state},{sent}/{total} 个实例",
              refused: "被拒绝"},
  };
  const w = (k, vars) => {
    let s = (WORDS[document.documentElement.lang] || WORDS.en)[k] || WORDS.en[k];
    for (const [n, v] of Object.entries(vars || {})) s = s.replace("{" + n + "}", v);
    return s;
  };
  let partners = null;
  const el = (tag, props, ...kids) => { const e = Object.assign(document.createElement(tag), props || {}); e.append(...kids); return e; };

  async function loadPartners() {
    if (partners !== null) return partners;
    const r = await fetch("api/consult/partners", {headers: auth()});
    partners = r.ok ? await r.json() : null;  // not yet logged in: asked again at the next page
    return partners;
  }

  function dialog(study, row) {
    const form = el("form", {className: "consult", method: "dialog"});
    const partner = el("select", {name: "partner"});
    for (const p of partners) partner.append(el("option", {value: p.name, textContent: p.name}));
    const expert = el("select", {name: "expert"});
    const fillExperts = () => {
      const p = partners.find(x => x.name === partner.value) || {experts: []};
      expert.replaceChildren(el("option", {value: "", textContent: w("any_expert")}),
        ...p.experts.map(e => el("option", {value: e.id, textContent: e.name + (e.specialties.length ? " (" + e.specialties.join(", ") + ")" : "")})));
    };
    partner.addEventListener("change", fillExperts); fillExperts();
    const priority = el("select", {name: "priority"}, ...["routine", "urgent", "frozen"].map(p => el("option", {value: p, textContent: w(p)})));
    const question = el("textarea", {name: "question", rows: 3, cols: 40});
    const physician = el("input", {name: "physician"});
    const deid = el("input", {type: "checkbox", name: "deidentify"});
    const status = el("p", {className: "consult-status"});
    const go = el("button", {type: "submit", textContent: w("go")});
    const cancel = el("button", {type: "button", textContent: w("cancel")});
    const label = (k, input) => el("label", {}, el("span", {textContent: w(k) + " "}), input);
    form.append(label("partner", partner), label("expert", expert), label("priority", priority),
                label("question", question), label("physician", physician), label("deidentify", deid),
                el("div", {}, go, " ", cancel), status);
    const dlg = el("dialog", {className: "consult-dialog"}, el("h3", {textContent: w("send")}), form);
    dlg.dataset.study = study;
    document.body.append(dlg);
    cancel.addEventListener("click", () => dlg.close());
    dlg.addEventListener("close", () => dlg.remove());
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      go.disabled = true;
      const body = {study, partner: partner.value, priority: priority.value, question: question.value,
                    physician: physician.value, deidentify: deid.checked};
      if (expert.value) body.expert = expert.value;
      const r = await fetch("api/consult/send", {method: "POST", body: JSON.stringify(body),
                                                 headers: {...auth(), "Content-Type": "application/json"}});
      if (!r.ok) { status.textContent = w("refused") + " (" + r.status + "): " + (await r.text()); go.disabled = false; return; }
      const job = await r.json();
      status.textContent = w("queued", {id: job.id});
      dlg.dataset.job = job.id;
      row.dataset.consultJob = job.id;
      follow(job.id, status, dlg);
    });
    dlg.showModal();
  }

  async function follow(id, status, dlg) {
    for (;;) {
      const r = await fetch("api/consult/jobs/" + encodeURIComponent(id), {headers: auth()});
      if (!r.ok) return;
      const job = await r.json();
      status.textContent = w("state", {id, state: job.state, sent: job.instances_sent, total: job.instances_total}) +
        (job.error ? " — " + job.error : "");
      dlg.dataset.state = job.state;
      if (["done", "failed", "cancelled"].includes(job.state)) return;
      await new Promise(ok => setTimeout(ok, 1000));
    }
  }

  function decorate() {
    if (!partners || !partners.length) return;
    for (const row of document.querySelectorAll("#studies tbody tr")) {
      if (row.querySelector("button.send-consult")) continue;
      const b = el("button", {type: "button", className: "send-consult", textContent: w("send")});
      b.addEventListener("click", () => dialog(row.dataset.study, row));
      row.lastElementChild.append(" ", b);
    }
  }

  const body = document.querySelector("#studies tbody");
  if (!body) return;
  new MutationObserver(async () => { await loadPartners(); decorate(); }).observe(body, {childList: true});
})();
