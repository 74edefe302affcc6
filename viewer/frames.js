/* global DICOMwebClient */
// Frames for dicom-microscopy-viewer, through standard WADO-RS only (PS3.18 "frames/1,2,3").
// The library asks one frame per request (src/pyramid.js, as many calls as OpenLayers loads tiles
// at once) and prefetches nothing finer. FrameClient is the dicomweb-client it is given: the single
// frame calls made in one task are sent as a few multi-frame requests, and once a view is drawn the
// next finer level under it and the current level around it are fetched ahead (raw bytes, bounded),
// so a zoom in or a pan finds them here. Decoding, the ICC transform and drawing stay the library's.
'use strict'

window.ppFrames = (() => {
  const Base = DICOMwebClient.api.DICOMwebClient
  const OCTET = 'application/octet-stream'
  const PER_REQUEST = 8 // frames per request the view waits for: a few requests in parallel still
  const PREFETCH_PER_REQUEST = 16
  const PREFETCH_PARALLEL = 2 // of chromium's 6 connections per host, so a demand is never queued behind
  const PREFETCH_MAX = 160 // frames per drawn view
  const CACHE_BYTES = 64 * 1024 * 1024

  // What dicom-microscopy-viewer asks: the stored transfer syntax as application/octet-stream.
  const batchable = (o) => Array.isArray(o.frameNumbers) && Array.isArray(o.mediaTypes) &&
    o.mediaTypes.length === 1 && o.mediaTypes[0].mediaType === OCTET && o.mediaTypes[0].transferSyntaxUID === '*' &&
    !o.queryParams && o.studyInstanceUID && o.seriesInstanceUID && o.sopInstanceUID

  const copy = (buf) => (ArrayBuffer.isView(buf) ? buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength) : buf.slice(0))

  function chunks(list, most) {
    const n = Math.ceil(list.length / most)
    const size = Math.ceil(list.length / n)
    const out = []
    for (let i = 0; i < list.length; i += size) out.push(list.slice(i, i + size))
    return out
  }

  class FrameClient extends Base {
    constructor(options) {
      super(options)
      this.cache = new Map() // "sop/n" -> ArrayBuffer, least recently used first
      this.cacheBytes = 0
      this.inflight = new Map() // "sop/n" -> Promise<ArrayBuffer>
      this.demand = new Map() // "study/series/sop" -> {options, frames: Map(n -> {resolve, reject})}
      this.demandInFlight = 0
      this.scheduled = false
      this.ahead = [] // [{options, n}] still to prefetch, in order
      this.aheadInFlight = 0
      // for the page's state (tests, bench): requests sent and what they were for
      this.stats = { requests: 0, multiFrameRequests: 0, framesRequested: 0, asked: 0, cacheHits: 0, joined: 0,
        prefetchRequests: 0, prefetchedFrames: 0, prefetchUrls: [], earlyBulk: 0 }
    }

    // The ICC profiles boot.js fetched while the bundle was parsed (else asked as usual).
    retrieveBulkData(options) {
      const early = window.ppEarly && window.ppEarly.bulk
      const asked = early && !options.mediaTypes && !options.byteRange && early.get(options.BulkDataURI)
      if (!asked) return super.retrieveBulkData(options)
      this.stats.earlyBulk += 1
      return asked.then((buf) => (buf ? [buf.slice(0)] : super.retrieveBulkData(options)))
    }

    retrieveInstanceFrames(options) {
      if (!batchable(options)) return super.retrieveInstanceFrames(options)
      return Promise.all(options.frameNumbers.map((n) => this._frame(options, Number(n)).then(copy)))
    }

    // The buffers handed out are copies: the library transfers each to its decoder worker.
    _frame(o, n) {
      const key = `${o.sopInstanceUID}/${n}`
      this.stats.asked += 1
      const hit = this.cache.get(key)
      if (hit) {
        this.stats.cacheHits += 1
        this.cache.delete(key)
        this.cache.set(key, hit)
        return Promise.resolve(hit)
      }
      const flying = this.inflight.get(key)
      if (flying) { // a prefetch (or another call) already asked: its answer, or ours if it failed
        this.stats.joined += 1
        return flying.catch(() => this._ask(o, n, key))
      }
      return this._ask(o, n, key)
    }

    _ask(o, n, key) {
      const group = `${o.studyInstanceUID}/${o.seriesInstanceUID}/${o.sopInstanceUID}`
      if (!this.demand.has(group)) this.demand.set(group, { options: o, frames: new Map() })
      const promise = new Promise((resolve, reject) => this.demand.get(group).frames.set(n, { resolve, reject }))
      this._track(key, promise)
      if (!this.scheduled) { // every call OpenLayers makes in this task joins the same requests
        this.scheduled = true
        queueMicrotask(() => this._flush())
      }
      return promise
    }

    _track(key, promise) {
      this.inflight.set(key, promise)
      promise.then((buf) => this._remember(key, buf), () => {}).finally(() => this.inflight.delete(key))
    }

    _remember(key, buf) {
      if (this.cache.has(key)) return
      this.cache.set(key, buf)
      this.cacheBytes += buf.byteLength
      for (const [k, b] of this.cache) {
        if (this.cacheBytes <= CACHE_BYTES) break
        this.cache.delete(k)
        this.cacheBytes -= b.byteLength
      }
    }

    _flush() {
      this.scheduled = false
      const groups = [...this.demand.values()]
      this.demand.clear()
      for (const { options, frames } of groups) {
        for (const part of chunks([...frames.keys()].sort((a, b) => a - b), PER_REQUEST)) {
          this.demandInFlight += 1
          this._send(options, part, false)
            .then((bufs) => part.forEach((n, i) => frames.get(n).resolve(bufs[i])))
            .catch((err) => this._singly(options, part, frames, err))
            .finally(() => { this.demandInFlight -= 1; this._pump() })
        }
      }
    }

    // A multi-frame request that failed is asked again frame by frame, so one bad frame (or a server
    // that refuses frame lists) does not blank its neighbours; each frame then fails on its own.
    // Settles when every retry has, so the view counts as waiting (no prefetch beside it) until then.
    _singly(options, part, frames, err) {
      if (part.length === 1) { frames.get(part[0]).reject(err); return Promise.resolve() }
      return Promise.allSettled(part.map((n) => this._send(options, [n], false)
        .then((bufs) => frames.get(n).resolve(bufs[0]), (e) => frames.get(n).reject(e))))
    }

    _send(o, numbers, prefetch) {
      this.stats.requests += 1
      this.stats.framesRequested += numbers.length
      if (numbers.length > 1) this.stats.multiFrameRequests += 1
      if (prefetch) {
        this.stats.prefetchRequests += 1
        this.stats.prefetchedFrames += numbers.length
        this.stats.prefetchUrls.push(`${o.sopInstanceUID}/frames/${numbers.join(',')}`)
        if (this.stats.prefetchUrls.length > 4000) this.stats.prefetchUrls.shift()
      }
      return super.retrieveInstanceFrames({
        studyInstanceUID: o.studyInstanceUID, seriesInstanceUID: o.seriesInstanceUID,
        sopInstanceUID: o.sopInstanceUID, frameNumbers: numbers, mediaTypes: o.mediaTypes,
      }).then((bufs) => {
        if (!Array.isArray(bufs) || bufs.length !== numbers.length) {
          throw new Error(`asked for ${numbers.length} frames, got ${bufs && bufs.length}`)
        }
        return bufs
      })
    }

    // Replaces what is still to prefetch (the newest view wins); sent while no view waits.
    prefetch(wanted) {
      this.ahead = wanted.filter(({ options, n }) => {
        const key = `${options.sopInstanceUID}/${n}`
        return !this.cache.has(key) && !this.inflight.has(key)
      })
      this._pump()
    }

    cancelPrefetch() { this.ahead = [] }

    _pump() {
      while (this.ahead.length && this.aheadInFlight < PREFETCH_PARALLEL && this.demandInFlight === 0 && !this.scheduled) {
        const sop = this.ahead[0].options.sopInstanceUID
        const batch = []
        while (this.ahead.length && batch.length < PREFETCH_PER_REQUEST && this.ahead[0].options.sopInstanceUID === sop) {
          const item = this.ahead.shift()
          const key = `${sop}/${item.n}`
          if (!this.cache.has(key) && !this.inflight.has(key)) batch.push(item)
        }
        if (!batch.length) continue
        const numbers = batch.map((b) => b.n).sort((a, b) => a - b)
        this.aheadInFlight += 1
        const sent = this._send(batch[0].options, numbers, true)
        numbers.forEach((n, i) => this._track(`${sop}/${n}`, sent.then((bufs) => bufs[i])))
        sent.catch(() => {}).finally(() => { this.aheadInFlight -= 1; this._pump() })
      }
    }
  }

  // --- what to prefetch for a drawn view ---------------------------------------------------------
  // A level's tiles as dicom-microscopy-viewer maps them (src/metadata.js): TILED_FULL in row-major
  // order, TILED_SPARSE by each frame's plane position. Levels with several optical paths or focal
  // planes are left to the library (which frame is which channel is its business).
  const indexes = new WeakMap() // image -> its frameIndex, built once (a sparse level's map has every frame)
  function frameIndex(im) {
    if (!indexes.has(im)) indexes.set(im, buildFrameIndex(im))
    return indexes.get(im)
  }

  function buildFrameIndex(im) {
    if (Number(im.NumberOfOpticalPaths || 1) !== 1 || Number(im.TotalPixelMatrixFocalPlanes || 1) !== 1) return null
    const cols = Math.ceil(im.TotalPixelMatrixColumns / im.Columns)
    const rows = Math.ceil(im.TotalPixelMatrixRows / im.Rows)
    if ((im.DimensionOrganizationType || 'TILED_SPARSE') === 'TILED_FULL') {
      return (c, r) => (c < cols && r < rows ? r * cols + c + 1 : null)
    }
    const at = new Map()
    for (const [j, item] of (im.PerFrameFunctionalGroupsSequence || []).entries()) {
      const pos = item.PlanePositionSlideSequence && item.PlanePositionSlideSequence[0]
      if (!pos) return null
      at.set(`${Math.ceil(pos.ColumnPositionInTotalImagePixelMatrix / im.Columns) - 1}/` +
        `${Math.ceil(pos.RowPositionInTotalImagePixelMatrix / im.Rows) - 1}`, j + 1)
    }
    return (c, r) => at.get(`${c}/${r}`) || null
  }

  // The frames of level `im` (zoom factor f to the base level) under `extent`, in the library's
  // map coordinates: base-level pixels, x to the right, y from -1 downwards.
  function framesUnder(im, f, extent, skip) {
    const index = frameIndex(im)
    if (!index) return []
    const tw = im.Columns * f, th = im.Rows * f
    const [x0, y0, x1, y1] = extent
    const c0 = Math.max(0, Math.floor(x0 / tw)), c1 = Math.floor(x1 / tw)
    const r0 = Math.max(0, Math.floor((-1 - y1) / th)), r1 = Math.floor((-1 - y0) / th)
    const options = { studyInstanceUID: im.StudyInstanceUID, seriesInstanceUID: im.SeriesInstanceUID,
      sopInstanceUID: im.SOPInstanceUID, mediaTypes: [{ mediaType: OCTET, transferSyntaxUID: '*' }] }
    const out = []
    for (let r = r0; r <= r1; r++) {
      for (let c = c0; c <= c1; c++) {
        if (skip && skip(c * tw, r * th, tw, th)) continue
        const n = index(c, r)
        if (n) out.push({ options, n })
      }
    }
    return out
  }

  // After each fully drawn view of `viewer` (a VolumeImageViewer over `images`): the next finer
  // level under the view, then the view's own level in a ring half a view wide around it.
  function attach(viewer, client, images) {
    const map = viewer.getMap()
    const base = Math.max(...images.map((im) => im.TotalPixelMatrixColumns))
    let grid = null, zDirection = 0
    const findGrid = () => {
      for (const layer of map.getLayers().getArray()) {
        const src = layer.getSource && layer.getSource()
        if (src && typeof src.getTileGrid === 'function' && src.getTileGrid()) {
          grid = src.getTileGrid(); zDirection = src.zDirection || 0
          return
        }
      }
    }
    // the image of each of the grid's resolutions (the library's levels, coarsest first)
    const levelOf = (res) => images.reduce((best, im) => {
      const d = Math.abs(base / im.TotalPixelMatrixColumns - res)
      return !best || d < best.d ? { im, d } : best
    }, null)
    let timer = 0
    const plan = () => {
      if (!grid) findGrid()
      const size = map.getSize()
      if (!grid || !size) return
      const view = map.getView()
      const extent = view.calculateExtent(size)
      const resolutions = grid.getResolutions()
      const z = grid.getZForResolution(view.getResolution(), zDirection)
      const wanted = []
      if (z + 1 < resolutions.length) {
        const finer = levelOf(resolutions[z + 1])
        wanted.push(...framesUnder(finer.im, resolutions[z + 1], extent))
      }
      const here = levelOf(resolutions[z])
      const w = extent[2] - extent[0], h = extent[3] - extent[1]
      const ring = [extent[0] - w / 2, extent[1] - h / 2, extent[2] + w / 2, extent[3] + h / 2]
      const inView = (x, yTop, tw, th) => x + tw > extent[0] && x < extent[2] &&
        -1 - yTop > extent[1] && -1 - yTop - th < extent[3]
      wanted.push(...framesUnder(here.im, resolutions[z], ring, inView))
      client.prefetch(wanted.slice(0, PREFETCH_MAX))
    }
    map.on('movestart', () => { clearTimeout(timer); client.cancelPrefetch() })
    map.on('rendercomplete', () => { clearTimeout(timer); timer = setTimeout(plan, 30) })
  }

  return { FrameClient, attach }
})()
