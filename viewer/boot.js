// Before the bundle loads: dicom-microscopy-viewer spawns its decoder worker from
// PUBLIC_LIB_URL + "dataLoader.worker.min.js" (its WebAssembly codecs beside it), which the
// package ships in dist/dynamic-import/; dicomweb/viewer.py serves dist/ at static/viewer/dmv/.
// Relative to the page, so a path prefix in front of the server works.
window.PUBLIC_LIB_URL = new URL('static/viewer/dmv/dynamic-import/', document.baseURI).href

// The first DICOMweb answers the page needs (the study's slides, the open slide's metadata) are
// asked for now, while the browser is still parsing the viewer's 2.6 MB bundle, not after it:
// viewer.js takes these promises (null: ask again through dicomweb-client, which reports errors).
window.ppEarly = (() => {
  const p = new URLSearchParams(location.search)
  const study = p.get('study'), series = p.get('series')
  const token = sessionStorage.getItem('pathpacs.token')
  const headers = { Accept: 'application/dicom+json', ...(token ? { Authorization: 'Bearer ' + token } : {}) }
  const base = new URL('dicomweb/', document.baseURI).href
  const get = (path) => fetch(base + path, { headers })
    .then((r) => (r.status === 200 ? r.json() : r.status === 204 ? [] : null)).catch(() => null)
  const ok = (uid) => uid && /^[0-9.]+$/.test(uid)
  if (!ok(study)) return {}
  // The library fetches each level's ICC profile (bulk data) once it has run, and asks for no tile
  // before they are all here: fetched as soon as the metadata names them (frames.js hands them over).
  // Keyed by URL as viewer.js rebases BulkDataURIs onto the page's own dicomweb/ (the library asks by that URL).
  const bulk = new Map() // URL -> Promise<ArrayBuffer | null>
  const iccOf = (md) => {
    for (const inst of md || []) {
      const op = inst['00480105'] && inst['00480105'].Value && inst['00480105'].Value[0]
      const uri = op && op['00282000'] && op['00282000'].BulkDataURI
      const i = uri ? uri.indexOf('/dicomweb/') : -1
      if (i < 0) continue
      const url = base + uri.slice(i + '/dicomweb/'.length)
      if (!bulk.has(url)) {
        bulk.set(url, fetch(url, { headers: { ...headers, Accept: 'application/octet-stream' } })
          .then((r) => (r.status === 200 ? r.arrayBuffer() : null)).catch(() => null))
      }
    }
    return md
  }
  return {
    series: get(`studies/${study}/series?Modality=SM`),
    metadata: ok(series) ? { [series]: get(`studies/${study}/series/${series}/metadata`).then(iccOf) } : {},
    bulk,
  }
})()

// dicom-microscopy-viewer spawns its first decoder worker only when the first frame has arrived,
// and that worker then spends a few hundred ms loading its 1 MB script before it decodes: start
// it now, while this page still parses the bundle (on another core), and hand it to the library
// when it asks for a worker of that URL. Any other Worker is created as usual.
;(() => {
  const Native = window.Worker
  if (typeof Native !== 'function') return
  const url = new URL('dataLoader.worker.min.js', window.PUBLIC_LIB_URL).href
  let spare
  try { spare = new Native(url, { type: 'module' }) } catch (_e) { return }
  function Worker (asked, options) {
    if (spare && new URL(String(asked), document.baseURI).href === url && options && options.type === 'module') {
      const w = spare
      spare = null
      return w
    }
    return new Native(asked, options)
  }
  Worker.prototype = Native.prototype
  window.Worker = Worker
})()
