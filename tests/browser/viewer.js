/* global DICOMwebClient, dicomMicroscopyViewer */
// Drives dicom-microscopy-viewer for tests/test_viewer_browser.py; see viewer.html for the query.
'use strict'

const state = (window.viewerTest = {
  status: 'loading', error: null, levels: 0, framesLoaded: 0,
  framesStarted: 0, framesEnded: 0, frameErrors: 0,
  errors: [], decoded: {}, lastFrameAt: 0, lastStartAt: 0, renderCompleteAt: 0,
})

function fail(err) {
  state.status = 'error'
  state.error = String((err && (err.stack || err.message)) || err)
}

window.addEventListener('error', (e) => state.errors.push(String(e.message)))
window.addEventListener('unhandledrejection', (e) => state.errors.push(String(e.reason && (e.reason.stack || e.reason))))
document.addEventListener('dicommicroscopyviewer_frame_loading_started', () => {
  state.framesStarted += 1
  state.lastStartAt = performance.now()
})
document.addEventListener('dicommicroscopyviewer_frame_loading_ended', (e) => {
  state.framesEnded += 1
  state.lastFrameAt = performance.now()
  const p = e.detail && e.detail.payload
  if (p && p.pixelArray) {
    state.framesLoaded += 1
    // First decoded pixel (RGB) of each frame, for comparison with the stored tiles
    state.decoded[p.sopInstanceUID + '/' + p.frameNumber] = Array.from(p.pixelArray.slice(0, 3))
  }
})
document.addEventListener('dicommicroscopyviewer_frame_loading_error', () => { state.frameErrors += 1 })
document.addEventListener('dicommicroscopyviewer_loading_error', (e) => {
  state.errors.push('loading_error: ' + JSON.stringify(e.detail && e.detail.payload))
})

async function main() {
  const params = new URLSearchParams(window.location.search)
  const client = new DICOMwebClient.api.DICOMwebClient({ url: params.get('dicomweb') })
  const metadata = await client.retrieveSeriesMetadata({
    studyInstanceUID: params.get('study'),
    seriesInstanceUID: params.get('series'),
  })
  const volumeImages = []
  for (const m of metadata) {
    const image = new dicomMicroscopyViewer.metadata.VLWholeSlideMicroscopyImage({ metadata: m })
    const flavor = image.ImageType[2]
    if (flavor === 'VOLUME' || flavor === 'THUMBNAIL') volumeImages.push(image)
  }
  state.levels = volumeImages.length
  const viewer = new dicomMicroscopyViewer.viewer.VolumeImageViewer({ client, metadata: volumeImages })
  viewer.render({ container: document.getElementById('viewport') })
  window.viewer = viewer
  // OpenLayers fires rendercomplete once no tile is loading and every layer is drawn.
  viewer.getMap().on('rendercomplete', () => { state.renderCompleteAt = performance.now() })
  state.status = 'rendered'
}

main().catch(fail)
