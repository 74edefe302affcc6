/* global dicomMicroscopyViewer, dcmjs */
// Annotations of the open slide as Microscopy Bulk Simple Annotations (SOP Class
// 1.2.840.10008.5.1.4.1.1.91.1, Modality ANN), the standard object Slim and highdicom use:
// - stored ones are found by QIDO in the study and drawn by dicom-microscopy-viewer as overlays,
//   one checkbox per annotation group;
// - marks drawn here (point, rectangle, polygon, free hand, each with a label) are saved as a
//   new ANN instance built with dcmjs and stored by STOW-RS to our own /dicomweb (the bearer
//   token rides in the dicomweb-client's headers).
// viewer.js calls ppAnnotations.attach() once a slide is shown. State for tests: window.ppViewer
// (annotationGroups, marks, saved).
'use strict'

window.ppAnnotations = (() => {
  const ANN_CLASS = '1.2.840.10008.5.1.4.1.1.91.1'
  const v = (doc, tag) => (doc && doc[tag] && doc[tag].Value) || []
  let current = null // {viewer, state}

  function panel(viewer, state, groups) {
    const ul = document.getElementById('annotation-groups')
    ul.replaceChildren()
    for (const g of groups) {
      const li = document.createElement('li')
      const box = document.createElement('input')
      box.type = 'checkbox'; box.checked = true; box.dataset.group = g.uid
      box.addEventListener('change', () => {
        if (box.checked) viewer.showAnnotationGroup(g.uid); else viewer.hideAnnotationGroup(g.uid)
        g.visible = box.checked
      })
      const label = document.createElement('label')
      const name = document.createElement('span')
      name.textContent = `${g.label} (${g.count})`
      label.append(box, name)
      li.append(label)
      ul.append(li)
    }
  }

  // Every ANN instance of the study that references one of the slide's images.
  async function find(client, studyUID, imageUIDs) {
    const series = await client.searchForSeries({ studyInstanceUID: studyUID, queryParams: { Modality: 'ANN' } })
    const out = []
    for (const s of series || []) {
      const md = await client.retrieveSeriesMetadata({ studyInstanceUID: studyUID, seriesInstanceUID: v(s, '0020000E')[0] })
      for (const doc of md) {
        if (v(doc, '00080016')[0] !== ANN_CLASS) continue
        const refs = v(doc, '00081140').map((r) => v(r, '00081155')[0])
        if (refs.some((uid) => imageUIDs.has(uid))) out.push(doc)
      }
    }
    return out
  }

  async function attach(options) {
    const { viewer, client, studyUID, images, state, rebase } = options
    if (!ctx || ctx.viewer !== viewer) { state.marks = []; state.saved = state.saved || [] }
    ctx = options
    current = { viewer, state }
    viewer.removeAllAnnotationGroups()
    state.annotationGroups = []
    state.annotationStatus = 'loading'
    const docs = await find(client, studyUID, new Set(images.map((im) => im.SOPInstanceUID)))
    for (const doc of docs) {
      rebase(doc)
      const ann = new dicomMicroscopyViewer.metadata.MicroscopyBulkSimpleAnnotations({ metadata: doc })
      viewer.addAnnotationGroups(ann)
      for (const item of ann.AnnotationGroupSequence) {
        viewer.showAnnotationGroup(item.AnnotationGroupUID)
        state.annotationGroups.push({ uid: item.AnnotationGroupUID, label: item.AnnotationGroupLabel,
          count: Number(item.NumberOfAnnotations), sop: ann.SOPInstanceUID, visible: true })
      }
    }
    panel(viewer, state, state.annotationGroups)
    listMarks()
    state.annotationStatus = 'shown'
  }

  // --- marks: drawn, labelled, saved as one new ANN instance -----------------------------------
  const DRAW = { point: 'POINT', box: 'RECTANGLE', polygon: 'POLYGON', freehandpolygon: 'POLYGON' }
  let marking = null // the dmv geometry type being drawn, or null
  let ctx = null // what attach() was given, for saving

  function setMarking(kind) {
    const { viewer, stopTool } = ctx || {}
    if (!viewer) return
    if (kind) stopTool() // the ruler/area tool of viewer.js, which shares the draw interaction
    viewer.deactivateDrawInteraction()
    marking = kind
    for (const b of document.querySelectorAll('[data-mark]')) b.classList.toggle('active', b.dataset.mark === kind)
    if (kind) viewer.activateDrawInteraction({ geometryType: kind })
  }

  // ROI coordinates are slide coordinates (mm, x y z), the frame of reference of the slide:
  // stored as they are (Annotation Coordinate Type 3D). A polygon's closing point is dropped.
  function points(roi) {
    let pts = roi.scoord3d.graphicData
    if (!Array.isArray(pts[0])) pts = [pts]
    pts = pts.map((p) => [Number(p[0]), Number(p[1]), Number(p[2] || 0)])
    const [a, b] = [pts[0], pts[pts.length - 1]]
    if (pts.length > 1 && a[0] === b[0] && a[1] === b[1] && a[2] === b[2]) pts = pts.slice(0, -1)
    return pts
  }

  function listMarks() {
    const ol = document.getElementById('mark-list')
    ol.replaceChildren()
    for (const m of ctx.state.marks) {
      const li = document.createElement('li')
      li.textContent = `${m.label} — ${ctx.T['mark_' + m.kind] || m.kind}`
      ol.append(li)
    }
    document.getElementById('save-marks').disabled = !ctx.state.marks.length
  }

  document.addEventListener('dicommicroscopyviewer_roi_drawn', (e) => {
    const roi = e.detail && e.detail.payload
    if (!marking || !roi || !ctx) return
    const label = document.getElementById('mark-label').value.trim() || ctx.T.mark_default
    ctx.state.marks.push({ uid: roi.uid, kind: marking, graphicType: DRAW[marking], label, points: points(roi) })
    listMarks()
  })

  const code = (CodeValue, CodingSchemeDesignator, CodeMeaning) => ({ CodeValue, CodingSchemeDesignator, CodeMeaning })
  const pad = (n, w = 2) => String(n).padStart(w, '0')

  // The ANN instance (PS3.3 A.87) of these marks: one annotation group per label and graphic
  // type; slide coordinates (3D) in the slide's frame of reference; referencing the base image.
  function buildAnn(marks) {
    const D = dcmjs.data
    const src = D.DicomMetaDictionary.naturalizeDataset(JSON.parse(JSON.stringify(ctx.docs[0])))
    const uid = () => D.DicomMetaDictionary.uid()
    const now = new Date()
    const date = `${now.getUTCFullYear()}${pad(now.getUTCMonth() + 1)}${pad(now.getUTCDate())}`
    const time = `${pad(now.getUTCHours())}${pad(now.getUTCMinutes())}${pad(now.getUTCSeconds())}`
    const groups = new Map()
    for (const m of marks) {
      const key = `${m.graphicType}\u0000${m.label}`
      if (!groups.has(key)) groups.set(key, { label: m.label, graphicType: m.graphicType, marks: [] })
      groups.get(key).marks.push(m)
    }
    const AnnotationGroupSequence = [...groups.values()].map((g, i) => {
      const coords = [], index = []
      for (const m of g.marks) {
        index.push(coords.length + 1) // 1-based, into the values (not the points)
        for (const p of m.points) coords.push(...p)
      }
      const item = {
        AnnotationGroupNumber: i + 1, AnnotationGroupUID: uid(), AnnotationGroupLabel: g.label.slice(0, 64),
        AnnotationGroupGenerationType: 'MANUAL',
        AnnotationPropertyCategoryCodeSequence: [code('91723000', 'SCT', 'Anatomical Structure')],
        AnnotationPropertyTypeCodeSequence: [code('85756007', 'SCT', 'Tissue')],
        NumberOfAnnotations: g.marks.length, AnnotationAppliesToAllOpticalPaths: 'YES',
        AnnotationAppliesToAllZPlanes: 'NO', // drawn on the focal plane shown, its z in each point
        GraphicType: g.graphicType, DoublePointCoordinatesData: [new Float64Array(coords).buffer],
      }
      // Long Primitive Point Index List is OL; dcmjs 0.41 knows it only as UL. The two encode
      // alike in Implicit VR Little Endian, the transfer syntax written below.
      if (g.graphicType === 'POLYGON') item.LongPrimitivePointIndexList = index
      return item
    })
    const base = ctx.docs[0]
    const sopClass = base['00080016'].Value[0], sopInstance = base['00080018'].Value[0]
    const sop = uid()
    const ds = {
      SpecificCharacterSet: 'ISO_IR 192', SOPClassUID: ANN_CLASS, SOPInstanceUID: sop,
      InstanceCreationDate: date, InstanceCreationTime: time,
      PatientName: src.PatientName || '', PatientID: src.PatientID || '', PatientBirthDate: src.PatientBirthDate || '',
      PatientSex: src.PatientSex || '',
      StudyInstanceUID: ctx.studyUID, StudyDate: src.StudyDate || '', StudyTime: src.StudyTime || '',
      ReferringPhysicianName: src.ReferringPhysicianName || '', StudyID: src.StudyID || '',
      AccessionNumber: src.AccessionNumber || '',
      // Laterality is Type 2C in General Series, needed unless an image-level laterality is sent
      // (an ANN object has none): the slide's, or empty (unknown)
      Modality: 'ANN', Laterality: src.Laterality || '', SeriesInstanceUID: uid(), SeriesNumber: 900, SeriesDescription: 'Annotations',
      FrameOfReferenceUID: src.FrameOfReferenceUID, PositionReferenceIndicator: src.PositionReferenceIndicator || '',
      Manufacturer: 'pathpacs', ManufacturerModelName: 'pathpacs viewer', DeviceSerialNumber: '1',
      SoftwareVersions: 'pathpacs',
      InstanceNumber: 1, ContentLabel: 'ANNOTATIONS', ContentDescription: '',
      ContentCreatorName: '', ContentDate: date, ContentTime: time,
      AnnotationCoordinateType: '3D',
      ReferencedSeriesSequence: [{
        SeriesInstanceUID: base['0020000E'].Value[0],
        ReferencedInstanceSequence: [{ ReferencedSOPClassUID: sopClass, ReferencedSOPInstanceUID: sopInstance }],
      }],
      ReferencedImageSequence: [{ ReferencedSOPClassUID: sopClass, ReferencedSOPInstanceUID: sopInstance }],
      AnnotationGroupSequence,
    }
    const meta = {
      FileMetaInformationVersion: new Uint8Array([0, 1]).buffer, MediaStorageSOPClassUID: ANN_CLASS,
      MediaStorageSOPInstanceUID: sop, TransferSyntaxUID: '1.2.840.10008.1.2',
      ImplementationClassUID: '2.25.119712237464591219837163720416302473845', ImplementationVersionName: 'pathpacs',
    }
    const dict = new D.DicomDict(D.DicomMetaDictionary.denaturalizeDataset(meta))
    dict.dict = D.DicomMetaDictionary.denaturalizeDataset(ds)
    return { sop, bytes: dict.write() }
  }

  // dcmjs (1.7 MB) is needed only to write an ANN: loaded on the first save, not with the page,
  // so its parsing does not delay the slide's first tiles.
  let dcmjsLoading = null
  function loadDcmjs() {
    if (window.dcmjs) return Promise.resolve()
    if (!dcmjsLoading) {
      dcmjsLoading = new Promise((resolve, reject) => {
        const s = document.createElement('script')
        s.src = 'static/viewer/dcmjs/dcmjs.js'
        s.onload = resolve
        s.onerror = () => { dcmjsLoading = null; reject(new Error('static/viewer/dcmjs/dcmjs.js did not load')) }
        document.head.append(s)
      })
    }
    return dcmjsLoading
  }

  async function save() {
    const { state, client, T } = ctx
    if (!state.marks.length) return
    setMarking(null)
    state.saveStatus = 'saving'
    await loadDcmjs()
    const { sop, bytes } = buildAnn(state.marks)
    try {
      await client.storeInstances({ studyInstanceUID: ctx.studyUID, datasets: [bytes] })
    } catch (err) {
      state.saveStatus = 'error'
      const code = err && err.request && err.request.status
      ctx.status(code ? `${T.save_failed} ${code}` : String(err.message || err), true)
      return
    }
    state.saved.push(sop)
    for (const m of state.marks) ctx.viewer.removeROI(m.uid)
    state.marks = []
    listMarks()
    await attach(ctx) // the saved instance comes back as a stored annotation
    state.saveStatus = 'saved'
    ctx.status(T.saved)
  }

  for (const b of document.querySelectorAll('[data-mark]')) {
    b.addEventListener('click', () => setMarking(marking === b.dataset.mark ? null : b.dataset.mark))
  }
  document.getElementById('save-marks').addEventListener('click', () => { save().catch((e) => ctx.fail(e)) })

  return { attach, current: () => current, marking: () => marking, stopMarking: () => setMarking(null) }
})()
