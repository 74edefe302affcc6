/* global DICOMwebClient, dicomMicroscopyViewer */
// The pathpacs whole-slide viewer (page: dicomweb/viewer.py). Standard DICOMweb only, to our own
// /dicomweb by a relative URL, with the bearer token the study list keeps in sessionStorage.
// dicom-microscopy-viewer draws the pyramid (VolumeImageViewer), the label and the overview, and
// applies the ICC profile; this file adds the controls around it. State for tests: window.ppViewer.
'use strict'

const dmv = dicomMicroscopyViewer
const T = JSON.parse(document.getElementById('pp-text').textContent)
const $ = (id) => document.getElementById(id)
const KEY = 'pathpacs.token'
const VOLUME_FLAVORS = ['VOLUME', 'THUMBNAIL']
const MAGS = [1, 5, 10, 20, 40] // objective powers; 40x is taken as 0.25 µm per screen pixel
const FIRST_VIEW_WAIT_MS = 1500 // the label and overview wait at most this long for the slide's first view

const state = (window.ppViewer = {
  status: 'loading', error: null, series: null, seriesList: [], levels: 0, baseSpacingUm: null,
  framesStarted: 0, framesEnded: 0, framesLoaded: 0, frameErrors: 0, lastFrameAt: 0, lastFrameStartAt: 0,
  renderCompleteAt: 0, errors: [], measurements: [], labelShown: false, overviewShown: false,
  // the page's clock at the first frame asked for, decoded, and two animation frames later (drawn):
  // what the viewer benchmark reads when no DevTools client watched the page load
  firstFrameStartAt: 0, firstFrameAt: 0, firstDrawnAt: 0,
})

window.addEventListener('error', (e) => state.errors.push(String(e.message)))
window.addEventListener('unhandledrejection', (e) => state.errors.push(String(e.reason && (e.reason.stack || e.reason))))
document.addEventListener('dicommicroscopyviewer_frame_loading_started', () => {
  state.framesStarted += 1
  state.lastFrameStartAt = performance.now()
  if (!state.firstFrameStartAt) state.firstFrameStartAt = state.lastFrameStartAt
})
document.addEventListener('dicommicroscopyviewer_frame_loading_ended', (e) => {
  state.framesEnded += 1
  state.lastFrameAt = performance.now()
  if (!(e.detail && e.detail.payload && e.detail.payload.pixelArray)) return
  state.framesLoaded += 1
  if (state.firstFrameAt) return
  state.firstFrameAt = state.lastFrameAt
  requestAnimationFrame(() => requestAnimationFrame(() => { state.firstDrawnAt = performance.now() }))
})
document.addEventListener('dicommicroscopyviewer_frame_loading_error', () => { state.frameErrors += 1 })

function status(text, isError) {
  $('status').textContent = text
  $('status').className = isError ? 'err' : ''
}

function fail(err) {
  state.status = 'error'
  state.error = String((err && (err.stack || err.message)) || err)
  const code = err && err.request && err.request.status
  if (code === 401) return status(sessionStorage.getItem('pathpacs.share') ? T.link_expired : T.login, true)
  status(code ? `${T.failed} ${code}` : state.error.split('\n')[0], true)
}

// --- DICOMweb ---------------------------------------------------------------------------------
const root = new URL('dicomweb', document.baseURI).href.replace(/\/$/, '')
const token = sessionStorage.getItem(KEY)
const client = new window.ppFrames.FrameClient({ // viewer/frames.js: several frames per request, prefetch
  url: root, headers: token ? { Authorization: 'Bearer ' + token } : {},
})
state.frameRequests = client.stats

// BulkDataURIs are absolute, as the server saw its own address; behind a proxy that does not
// say X-Forwarded-*, they would name the wrong host. What follows /dicomweb/ is ours: rebase it.
function rebaseBulkData(node) {
  if (Array.isArray(node)) { node.forEach(rebaseBulkData); return }
  if (!node || typeof node !== 'object') return
  for (const [k, v] of Object.entries(node)) {
    if (k === 'BulkDataURI' && typeof v === 'string') {
      const i = v.indexOf('/dicomweb/')
      if (i >= 0) node[k] = root + v.slice(i + '/dicomweb'.length)
    } else if (v && typeof v === 'object') {
      rebaseBulkData(v)
    }
  }
}

// --- DICOM JSON values ------------------------------------------------------------------------
const values = (doc, tag) => (doc && doc[tag] && doc[tag].Value) || []
const first = (doc, tag) => values(doc, tag)[0]
const items = (doc, ...path) => path.reduce((docs, tag) => docs.flatMap((d) => values(d, tag)), [doc])
function personName(doc, tag) {
  return values(doc, tag).map((v) => {
    const [family, ...rest] = ((v && v.Alphabetic) || '').split('^')
    const given = rest.filter(Boolean).join(' ')
    return family && given ? `${family}, ${given}` : family || given
  }).join('; ')
}

function pixelSpacingMm(doc) {
  const ps = items(doc, '52009229', '00289110').map((m) => values(m, '00280030')).find((v) => v.length === 2)
  if (ps) return ps.map(Number)
  const w = Number(first(doc, '00480001')), cols = Number(first(doc, '00480006'))
  const h = Number(first(doc, '00480002')), rows = Number(first(doc, '00480007'))
  return w && cols && h && rows ? [h / rows, w / cols] : null
}

function stains(doc) {
  // SpecimenPreparationStepContentItemSequence: "Using substance" (SCT 424361007) names the stain
  const out = []
  for (const step of items(doc, '00400560', '00400610', '00400612')) {
    const name = values(step, '0040A043')[0]
    if (!name || first(name, '00080100') !== '424361007') continue
    const code = values(step, '0040A168')[0]
    out.push((code && first(code, '00080104')) || first(step, '0040A160'))
  }
  return out.filter(Boolean)
}

function showMetadata(doc, volumes) {
  const base = volumes[0]
  const spacing = pixelSpacingMm(base)
  const objective = items(doc, '00480105').map((op) => {
    const power = first(op, '00480112'), na = first(op, '00480113')
    return [power && `${power}x`, na && `NA ${na}`].filter(Boolean).join(' ')
  }).filter(Boolean)
  const specimens = items(doc, '00400560').map((s) =>
    [first(s, '00400551'), first(s, '00400600')].filter(Boolean).join(' — ')).filter(Boolean)
  const rows = [
    [T.patient, personName(doc, '00100010')], [T.patient_id, first(doc, '00100020')],
    [T.accession, first(doc, '00080050')], [T.specimen, specimens.join('; ')],
    [T.stain, stains(doc).join(', ')],
    [T.scanner, [first(doc, '00080070'), first(doc, '00081090'), first(doc, '00181000')].filter(Boolean).join(' ')],
    [T.objective, objective.join('; ')],
    [T.spacing, spacing ? `${(spacing[1] * 1000).toFixed(3)} × ${(spacing[0] * 1000).toFixed(3)} µm` : ''],
    [T.size, `${first(base, '00480006')} × ${first(base, '00480007')} px`],
    [T.levels, String(volumes.length)],
  ]
  const dl = $('meta')
  dl.replaceChildren()
  for (const [k, v] of rows) {
    const dt = document.createElement('dt'); dt.textContent = k
    const dd = document.createElement('dd'); dd.textContent = v || T.none
    dd.dataset.key = k
    dl.append(dt, dd)
  }
}

// --- the slides of the study ------------------------------------------------------------------
const params = new URLSearchParams(location.search)
const studyUID = params.get('study')
let viewer = null
let sideViewers = []
const metadataCache = new Map()

const early = window.ppEarly || {} // boot.js: asked for before the bundle was parsed

async function seriesMetadata(seriesUID) {
  if (!metadataCache.has(seriesUID)) {
    const asked = early.metadata && early.metadata[seriesUID]
    const md = (asked && await asked) ||
      await client.retrieveSeriesMetadata({ studyInstanceUID: studyUID, seriesInstanceUID: seriesUID })
    rebaseBulkData(md)
    metadataCache.set(seriesUID, md)
  }
  return metadataCache.get(seriesUID)
}

const flavor = (doc) => values(doc, '00080008')[2]

async function listSeries() {
  const asked = early.series
  early.series = null // once: the switcher asks again later
  const found = (asked && await asked) ||
    await client.searchForSeries({ studyInstanceUID: studyUID, queryParams: { Modality: 'SM' } })
  const list = (found || []).map((s) => ({
    uid: first(s, '0020000E'), number: Number(first(s, '00200011') || 0), description: first(s, '0008103E') || '',
  }))
  list.sort((a, b) => a.number - b.number || a.uid.localeCompare(b.uid))
  return list
}

function fillSwitcher(list, current) {
  const sel = $('series')
  sel.replaceChildren()
  list.forEach((s, i) => {
    const opt = document.createElement('option')
    opt.value = s.uid
    opt.textContent = `${i + 1}. ${s.description || T.slide + ' ' + (s.number || i + 1)}`
    opt.selected = s.uid === current
    sel.append(opt)
  })
}

function clearViewers() {
  closeCompare()
  client.cancelPrefetch() // what was still to fetch ahead for the slide being closed
  if (viewer) { viewer.cleanup(); viewer = null }
  for (const v of sideViewers) v.cleanup && v.cleanup()
  sideViewers = []
  for (const id of ['viewport', 'label', 'overview']) $(id).replaceChildren()
  state.measurements = []
  window.ppAnnotations.stopMarking()
  state.labelShown = state.overviewShown = false
  $('measurements').replaceChildren()
  setTool(null)
}

async function volumesOf(seriesUID) {
  const md = await seriesMetadata(seriesUID)
  const images = md.map((m) => new dmv.metadata.VLWholeSlideMicroscopyImage({ metadata: m }))
  const volumes = images.filter((im) => VOLUME_FLAVORS.includes(im.ImageType[2]))
  if (!volumes.length) throw new Error(T.no_series)
  volumes.sort((a, b) => b.TotalPixelMatrixColumns - a.TotalPixelMatrixColumns)
  const docs = md.filter((m) => VOLUME_FLAVORS.includes(flavor(m)))
    .sort((a, b) => Number(first(b, '00480006')) - Number(first(a, '00480006')))
  const spacing = pixelSpacingMm(docs[0])
  return { md, images, volumes, docs, spacingUm: spacing ? spacing[1] * 1000 : 1 }
}

async function loadSeries(seriesUID) {
  state.status = 'loading'
  status(T.loading)
  clearViewers()
  const { images, volumes, docs: volumeDocs, spacingUm } = await volumesOf(seriesUID)
  state.series = seriesUID
  params.set('series', seriesUID)
  state.levels = volumes.length
  state.baseSpacingUm = pixelSpacingMm(volumeDocs[0]) ? spacingUm : null
  state.baseImage = { sop: first(volumeDocs[0], '00080018'), sopClass: first(volumeDocs[0], '00080016') } // consult.js: regions
  viewer = new dmv.viewer.VolumeImageViewer({ client, metadata: volumes, controls: [] })
  viewer.render({ container: $('viewport') })
  window.viewer = viewer
  const map = viewer.getMap()
  preloadCoarser(map)
  window.ppFrames.attach(viewer, client, volumes)
  map.on('rendercomplete', () => { state.renderCompleteAt = performance.now() })
  state.initialRotation = map.getView().getRotation()
  primary = { spacingUm: state.baseSpacingUm || 1, rotation0: state.initialRotation }
  watch(viewer, 1)
  map.getView().on('change:rotation', showAngle)
  showAngle()
  showMetadata(volumeDocs[0], volumeDocs)
  // The label and overview share the decoder workers with the slide: they start once the slide's
  // first view is drawn (or after FIRST_VIEW_WAIT_MS), so the first tiles are not queued behind them.
  const firstView = new Promise((resolve) => {
    map.once('rendercomplete', resolve)
    setTimeout(resolve, FIRST_VIEW_WAIT_MS)
  })
  fillCompare(seriesUID)
  updateUrl()
  $('viewport').focus()
  try { // stored annotations (viewer/annotations.js): a failure there leaves the slide shown
    await window.ppAnnotations.attach({ viewer, client, studyUID, images: volumes, docs: volumeDocs, state, T,
      rebase: rebaseBulkData, stopTool: () => setTool(null), status, fail })
  } catch (err) {
    state.annotationStatus = 'error'
    state.errors.push(`annotations: ${err.message || err}`)
  }
  await firstView
  if (state.series !== seriesUID) return // another slide was chosen meanwhile
  for (const [kind, id, Viewer] of [['LABEL', 'label', dmv.viewer.LabelImageViewer],
    ['OVERVIEW', 'overview', dmv.viewer.OverviewImageViewer]]) {
    const im = images.find((i) => i.ImageType[2] === kind)
    if (!im) continue
    try {
      const v = new Viewer({ client, metadata: im, resizeFactor: 1, includeIccProfile: true,
        orientation: kind === 'LABEL' ? 'vertical' : 'horizontal' })
      v.render({ container: $(id) })
      sideViewers.push(v)
      state[kind === 'LABEL' ? 'labelShown' : 'overviewShown'] = true
    } catch (err) {
      state.errors.push(`${kind}: ${err.message || err}`)
    }
  }
  state.status = 'rendered'
  status(T.ready)
}

// --- side by side: a second slide whose view follows the first (and the first it) --------------
// Linked in physical units (µm, through each slide's pixel spacing), rotation relative to each
// slide's own orientation, with the offset the two had when they were last linked.
let viewer2 = null
let primary = null // {spacingUm, rotation0} of the main slide
let second = null
const link = { on: true, dx: 0, dy: 0, rot: 0 }
let syncing = false

function updateUrl() {
  history.replaceState(null, '', `viewer?${params}`)
}

function fillCompare(current) {
  const sel = $('compare')
  for (const opt of [...sel.options].slice(1)) opt.remove()
  for (const opt of $('series').options) {
    if (opt.value === current) continue
    const o = document.createElement('option')
    o.value = opt.value; o.textContent = opt.textContent
    sel.append(o)
  }
  sel.value = ''
}

function closeCompare() {
  if (viewer2) { viewer2.cleanup(); viewer2 = null }
  window.viewer2 = null
  second = null
  state.compare = null
  params.delete('compare')
  $('viewport2').replaceChildren()
  $('viewport2').hidden = true
  $('link').hidden = true
  if (viewer) viewer.resize()
}

function physical(v, info) {
  const c = v.getMap().getView().getCenter()
  return [c[0] * info.spacingUm, c[1] * info.spacingUm]
}

function follow(srcViewer, src, dstViewer, dst, sign) {
  const sv = srcViewer.getMap().getView(), dv = dstViewer.getMap().getView()
  const [x, y] = physical(srcViewer, src)
  dv.setRotation(sv.getRotation() - src.rotation0 + dst.rotation0 + sign * link.rot)
  dv.setResolution(sv.getResolution() * src.spacingUm / dst.spacingUm)
  dv.setCenter([(x + sign * link.dx) / dst.spacingUm, (y + sign * link.dy) / dst.spacingUm])
}

function linkViews(from) {
  if (!link.on || syncing || !viewer || !viewer2) return
  syncing = true
  try {
    if (from === 1) follow(viewer, primary, viewer2, second, 1)
    else follow(viewer2, second, viewer, primary, -1)
  } finally { syncing = false }
}

function setLinked(on) {
  link.on = on
  if (on && viewer && viewer2) { // keep the offset the slides have now
    const [x1, y1] = physical(viewer, primary), [x2, y2] = physical(viewer2, second)
    link.dx = x2 - x1; link.dy = y2 - y1
    link.rot = (viewer2.getMap().getView().getRotation() - second.rotation0) -
      (viewer.getMap().getView().getRotation() - primary.rotation0)
  }
  state.linked = on
  state.offsetUm = [link.dx, link.dy]
  $('link').classList.toggle('active', on)
}

// OpenLayers' `preload` (dicom-microscopy-viewer sets 0, or 1 level with its `preload` option):
// the tile layers also load every coarser level of the view, so a place panned to shows the next
// coarser level at once (a few small tiles) instead of blank tiles until its own arrive.
function preloadCoarser(map) {
  const set = (layer) => { if (typeof layer.setPreload === 'function') layer.setPreload(Infinity) }
  map.getLayers().forEach(set)
  map.getLayers().on('add', (e) => set(e.element))
}

function watch(v, which) {
  const view = v.getMap().getView()
  for (const ev of ['change:center', 'change:resolution', 'change:rotation']) view.on(ev, () => linkViews(which))
}

async function loadCompare(seriesUID) {
  closeCompare()
  if (seriesUID) {
    state.compareStatus = 'loading'
    const { volumes, spacingUm } = await volumesOf(seriesUID)
    $('viewport2').hidden = false
    viewer.resize()
    viewer2 = new dmv.viewer.VolumeImageViewer({ client, metadata: volumes, controls: [] })
    viewer2.render({ container: $('viewport2') })
    window.viewer2 = viewer2
    second = { spacingUm, rotation0: viewer2.getMap().getView().getRotation() }
    preloadCoarser(viewer2.getMap())
    window.ppFrames.attach(viewer2, client, volumes)
    viewer2.getMap().on('rendercomplete', () => { state.renderCompleteAt = performance.now() })
    watch(viewer2, 2)
    link.dx = link.dy = link.rot = 0
    setLinked(true)
    linkViews(1)
    $('link').hidden = false
    $('compare').value = seriesUID
    params.set('compare', seriesUID)
    state.compare = seriesUID
    state.compareStatus = 'rendered'
  }
  updateUrl()
}

// --- navigation -------------------------------------------------------------------------------
const view = () => viewer.getMap().getView()

function zoomToMagnification(mag) {
  // the map's unit is a base-level pixel: resolution = base pixels per screen pixel
  if (!viewer || !state.baseSpacingUm) return
  view().setResolution((10 / mag) / state.baseSpacingUm)
}

function rotateBy(degrees) {
  if (!viewer) return
  view().setRotation(view().getRotation() + degrees * Math.PI / 180)
}

function showAngle() {
  if (!viewer) return
  // relative to the slide's own orientation (the library starts from ImageOrientationSlide)
  const deg = ((Math.round((view().getRotation() - state.initialRotation) * 180 / Math.PI) % 360) + 360) % 360
  state.rotation = deg
  $('angle').textContent = `${deg}°`
}

function panBy(dx, dy) {
  const map = viewer.getMap()
  const [w, h] = map.getSize()
  view().setCenter(map.getCoordinateFromPixel([w / 2 + dx, h / 2 + dy]))
}

// --- measurement ------------------------------------------------------------------------------
let tool = null

function setTool(name) {
  if (name) window.ppAnnotations.stopMarking() // marks (annotations.js) share the draw interaction
  if (viewer) viewer.deactivateDrawInteraction()
  tool = viewer ? name : null
  for (const b of document.querySelectorAll('[data-tool]')) b.classList.toggle('active', b.dataset.tool === tool)
  if (!tool) { if (state.status === 'rendered') status(T.ready); return }
  const opts = { geometryType: tool, markup: 'measurement' }
  if (tool === 'line') Object.assign(opts, { maxPoints: 2, minPoints: 2 })
  viewer.activateDrawInteraction(opts)
  status(tool === 'line' ? T.draw_line : T.draw_polygon)
}

function formatLength(um) { return um >= 1000 ? `${(um / 1000).toFixed(3)} mm` : `${um.toFixed(1)} µm` }
function formatArea(um2) { return um2 >= 1e6 ? `${(um2 / 1e6).toFixed(4)} mm²` : `${um2.toFixed(1)} µm²` }

// ROI coordinates are in the slide coordinate system, millimetres (the library maps them through
// the image's pixel spacing and orientation): lengths and areas follow directly.
function measure(roi) {
  const pts = roi.scoord3d.graphicData
  const type = roi.scoord3d.graphicType
  if (type === 'POLYLINE' && tool === 'line') {
    let mm = 0
    for (let i = 1; i < pts.length; i++) mm += Math.hypot(pts[i][0] - pts[i - 1][0], pts[i][1] - pts[i - 1][1])
    return { kind: 'length', um: mm * 1000, text: `${T.length}: ${formatLength(mm * 1000)}` }
  }
  if (type === 'POLYGON') {
    let twice = 0
    for (let i = 0; i < pts.length; i++) {
      const [x1, y1] = pts[i], [x2, y2] = pts[(i + 1) % pts.length]
      twice += x1 * y2 - x2 * y1
    }
    const um2 = Math.abs(twice) / 2 * 1e6
    return { kind: 'area', um2, text: `${T.area_m}: ${formatArea(um2)}` }
  }
  return null
}

document.addEventListener('dicommicroscopyviewer_roi_drawn', (e) => {
  const roi = e.detail && e.detail.payload
  if (window.ppAnnotations.marking()) return // a mark to save (annotations.js), not a measurement
  const m = roi && measure(roi)
  if (!m) return
  m.uid = roi.uid
  state.measurements.push(m)
  const li = document.createElement('li')
  li.textContent = m.text
  $('measurements').append(li)
})

// --- controls ---------------------------------------------------------------------------------
for (const b of document.querySelectorAll('[data-mag]')) b.addEventListener('click', () => zoomToMagnification(Number(b.dataset.mag)))
$('rotl').addEventListener('click', () => rotateBy(-90))
$('rotr').addEventListener('click', () => rotateBy(90))
for (const b of document.querySelectorAll('[data-tool]')) b.addEventListener('click', () => setTool(tool === b.dataset.tool ? null : b.dataset.tool))
$('clear').addEventListener('click', () => {
  if (viewer) viewer.removeAllROIs()
  state.measurements = []
  $('measurements').replaceChildren()
})
$('series').addEventListener('change', (e) => loadSeries(e.target.value).catch(fail))
$('compare').addEventListener('change', (e) => loadCompare(e.target.value).catch(fail))
$('link').addEventListener('click', () => setLinked(!link.on))

document.addEventListener('keydown', (e) => {
  if (!viewer || e.target.tagName === 'SELECT' || e.target.tagName === 'INPUT' || e.ctrlKey || e.metaKey || e.altKey) return
  const step = 100
  const keys = {
    ArrowLeft: () => panBy(-step, 0), ArrowRight: () => panBy(step, 0),
    ArrowUp: () => panBy(0, -step), ArrowDown: () => panBy(0, step),
    '+': () => view().setZoom(view().getZoom() + 1), '=': () => view().setZoom(view().getZoom() + 1),
    '-': () => view().setZoom(view().getZoom() - 1),
    '[': () => rotateBy(e.shiftKey ? -90 : -15), ']': () => rotateBy(e.shiftKey ? 90 : 15),
    '{': () => rotateBy(-90), '}': () => rotateBy(90),
    r: () => setTool(tool === 'line' ? null : 'line'), a: () => setTool(tool === 'polygon' ? null : 'polygon'),
    Escape: () => { setTool(null); window.ppAnnotations.stopMarking() },
  }
  MAGS.forEach((m, i) => { keys[String(i + 1)] = () => zoomToMagnification(m) })
  const act = keys[e.key] || keys[e.key.toLowerCase()]
  if (!act) return
  e.preventDefault()
  act()
})

async function main() {
  if (!studyUID) { state.status = 'error'; state.error = 'no study'; status(T.no_study, true); return }
  const list = await listSeries()
  state.seriesList = list.map((s) => s.uid)
  let chosen = params.get('series')
  if (!chosen) {
    for (const s of list) { // the study's first series with a VOLUME image
      if ((await seriesMetadata(s.uid)).some((m) => flavor(m) === 'VOLUME')) { chosen = s.uid; break }
    }
  }
  if (!chosen) { state.status = 'error'; state.error = 'no series'; status(T.no_series, true); return }
  if (!list.some((s) => s.uid === chosen)) list.push({ uid: chosen, number: 0, description: '' })
  fillSwitcher(list, chosen)
  const compare = params.get('compare') // read first: loading a slide closes the one beside it
  await loadSeries(chosen)
  if (compare && compare !== chosen && list.some((s) => s.uid === compare)) await loadCompare(compare)
}

main().catch(fail)
