// The consultation panel of the viewer (issue 12): when the open study is a case of this
// archive's consultation inbox, show its question and let the consultant accept, decline (with
// a reason) or write the opinion, optionally with the marks drawn with the annotation tools
// (annotations.js) as regions on the slide. Posts to /api/consult/inbox/{id}/...; the archive
// stores the opinion SR in the case and sends it back. State for tests: window.ppConsult.
'use strict'

;(() => {
  const T = JSON.parse(document.getElementById('pp-text').textContent)
  const params = new URLSearchParams(location.search)
  const study = params.get('study')
  const wanted = params.get('consult')
  const token = sessionStorage.getItem('pathpacs.token')
  const headers = token ? { Authorization: 'Bearer ' + token } : {}
  const api = new URL('api/consult/inbox', document.baseURI).href
  const state = (window.ppConsult = { status: 'loading', case: null, result: null, error: null })
  const el = (tag, attrs, text) => {
    const e = document.createElement(tag)
    Object.assign(e, attrs || {})
    if (text !== undefined) e.textContent = text
    return e
  }

  function say(text, isError) {
    const p = document.getElementById('consult-status')
    p.textContent = text
    p.className = isError ? 'err' : ''
  }

  function render(c) {
    const box = el('section', { id: 'consult' })
    box.append(el('h2', {}, T.t_consult))
    const dl = el('dl')
    for (const [k, v] of [['c_from', c.partner || c.requester], ['c_priority', c.priority], ['c_state', c.state]]) {
      dl.append(el('dt', {}, T[k]), el('dd', { id: 'consult-' + k.slice(2) }, v || ''))
    }
    box.append(dl, el('h3', {}, T.c_question), el('p', { id: 'consult-question' }, c.question || ''))
    const text = el('textarea', { id: 'consult-opinion', rows: 6, placeholder: T.c_opinion })
    text.setAttribute('aria-label', T.c_opinion)
    const marks = el('input', { type: 'checkbox', id: 'consult-use-marks', checked: true })
    const markLabel = el('label', {}, '')
    markLabel.append(marks, document.createTextNode(' ' + T.c_use_marks))
    const reason = el('input', { id: 'consult-reason', maxLength: 1000, placeholder: T.c_reason })
    reason.setAttribute('aria-label', T.c_reason)
    const accept = el('button', { id: 'consult-accept' }, T.c_accept)
    const decline = el('button', { id: 'consult-decline' }, T.c_decline)
    const send = el('button', { id: 'consult-send' }, T.c_send)
    box.append(el('h3', {}, T.c_opinion), text, markLabel, el('div', { className: 'group' }), reason,
      el('div'), accept, decline, send, el('p', { id: 'consult-status', role: 'status' }))
    const side = document.getElementById('side')
    side.prepend(box)
    const done = ['declined', 'answered'].includes(c.state)
    for (const b of [accept, decline, send, text, reason]) b.disabled = done
    accept.disabled = done || c.state === 'accepted'
    accept.addEventListener('click', () => act('accept', {}, T.c_accepted))
    decline.addEventListener('click', () => {
      if (!reason.value.trim()) return say(T.c_need_reason, true)
      act('decline', { reason: reason.value.trim() }, T.c_declined)
    })
    send.addEventListener('click', () => {
      if (!text.value.trim()) return say(T.c_need_text, true)
      act('answer', { text: text.value, regions: marks.checked ? regions() : [] }, T.c_sent)
    })
  }

  // The marks drawn on the slide (annotations.js, slide coordinates in mm) as regions of the
  // base image; the archive maps them to its pixel coordinates.
  function regions() {
    const v = window.ppViewer || {}
    const base = v.baseImage
    if (!base || !base.sop) return []
    return (v.marks || []).map((m) => ({
      sop_instance_uid: base.sop, sop_class_uid: base.sopClass, label: m.label,
      graphic_type: m.graphicType === 'POINT' ? 'POINT' : 'POLYGON', slide_points: m.points,
    }))
  }

  async function act(action, body, okText) {
    const c = state.case
    state.status = action + 'ing'
    try {
      const r = await fetch(`${api}/${encodeURIComponent(c.id)}/${action}`, {
        method: 'POST', headers: { ...headers, 'Content-Type': 'application/json' }, body: JSON.stringify(body),
      })
      if (!r.ok) {
        state.status = 'error'
        state.error = `${r.status} ${(await r.text()).trim()}`
        return say(`${T.c_failed} ${state.error}`, true)
      }
      state.case = await r.json()
      state.result = action
      state.status = 'done'
      document.getElementById('consult').remove()
      render(state.case)
      say(okText)
    } catch (err) {
      state.status = 'error'
      state.error = String(err)
      say(state.error, true)
    }
  }

  async function load() {
    if (!study) { state.status = 'none'; return }
    const r = await fetch(`${api}?study=${encodeURIComponent(study)}`, { headers })
    if (!r.ok) { state.status = 'none'; state.error = String(r.status); return }
    const cases = await r.json()
    const c = (wanted && cases.find((x) => x.id === wanted)) || cases[0]
    if (!c) { state.status = 'none'; return }
    state.case = c
    render(c)
    state.status = 'shown'
  }

  load().catch((err) => { state.status = 'error'; state.error = String(err) })
})()
