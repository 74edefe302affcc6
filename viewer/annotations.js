/* global dicomMicroscopyViewer, dcmjs */
// Stored annotations of the open slide (Microscopy Bulk Simple Annotations, SOP Class
// 1.2.840.10008.5.1.4.1.1.91.1, Modality ANN): found by QIDO in the study, drawn as overlays
// by dicom-microscopy-viewer, one checkbox per annotation group. viewer.js calls
// ppAnnotations.attach() once a slide is shown. State for tests: window.ppViewer.annotationGroups.
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

  async function attach({ viewer, client, studyUID, images, state, rebase }) {
    current = { viewer, state }
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
    state.annotationStatus = 'shown'
  }

  return { attach, current: () => current }
})()
