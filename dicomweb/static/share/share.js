// The page a share link opens (dicomweb/share.py): /share#<token>. The token leaves the
// address bar and history at once, goes where the viewer reads its bearer token
// (sessionStorage "pathpacs.token"), and the page becomes the viewer on the link's study.
'use strict'
;(function () {
  const KEY = 'pathpacs.token'
  const $ = (id) => document.getElementById(id)
  function show (id, text) {
    $('opening').hidden = true
    if (text) $(id).textContent = text
    $(id).hidden = false
  }
  let tok = decodeURIComponent(location.hash.replace(/^#(token=)?/, '')).trim()
  if (location.hash) history.replaceState(null, '', location.pathname + location.search)
  if (tok) {
    sessionStorage.setItem(KEY, tok)
    sessionStorage.setItem('pathpacs.share', '1') // the viewer then says "expired" on a 401, not "log in"
  } else if (sessionStorage.getItem('pathpacs.share')) {
    tok = sessionStorage.getItem(KEY) || '' // a reload of this page
  }
  if (!tok) return show('missing')
  fetch('api/whoami', { headers: { Authorization: 'Bearer ' + tok }, cache: 'no-store' }).then(async (r) => {
    if (r.status === 401) {
      sessionStorage.removeItem(KEY)
      return show('expired')
    }
    if (!r.ok) return show('failed', `${$('failed').dataset.text} ${r.status}`)
    const me = await r.json()
    if (!me.studies || me.studies.length !== 1) return show('failed', `${$('failed').dataset.text} ${r.status}`)
    location.replace('viewer?study=' + encodeURIComponent(me.studies[0]))
  }).catch((err) => show('failed', `${$('failed').dataset.text}: ${err.message || err}`))
})()
