// Before the bundle loads: dicom-microscopy-viewer spawns its decoder worker from
// PUBLIC_LIB_URL + "dataLoader.worker.min.js" (its WebAssembly codecs beside it), which the
// package ships in dist/dynamic-import/; dicomweb/viewer.py serves dist/ at static/viewer/dmv/.
// Relative to the page, so a path prefix in front of the server works.
window.PUBLIC_LIB_URL = new URL('static/viewer/dmv/dynamic-import/', document.baseURI).href
