// `node viewer/build.mjs [--quiet]`: build dicom-microscopy-viewer for the page from the ES
// sources its npm package ships (src/), with esbuild, into viewer/build/ (git-ignored).
//
// Why not serve the package's dist/dicomMicroscopyViewer.bundle.min.js: it is compiled by babel
// for Internet Explorer 11 with the core-js runtime and all of lodash and mathjs (2.6 MB), and
// running it is most of the time before the first tile. Measured here (headless chromium, 2
// cores, the viewer page): the shipped bundle ran 1.3-1.8 s, this build (modern syntax, only
// what the library uses) 0.94-1.28 s, and the first tile came 0.4-1 s sooner (BENCHMARKS.md).
// The decoder worker and its WebAssembly codecs are still the package's own (dist/dynamic-import).
//
// The library imports lodash without declaring it (its dist bundles it); lodash-es, pinned in
// package.json, is the same code as ES modules, so only debounce and has are kept.
import { build } from 'esbuild'
import { rmSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

const here = dirname(fileURLToPath(import.meta.url))
const quiet = process.argv.includes('--quiet')
const outfile = join(here, 'build', 'dicomMicroscopyViewer.min.js')

rmSync(join(here, 'build'), { recursive: true, force: true }) // nothing stale beside it
try {
  const result = await build({
    absWorkingDir: here,
    entryPoints: ['node_modules/dicom-microscopy-viewer/src/dicom-microscopy-viewer.js'],
    bundle: true,
    format: 'iife',
    globalName: 'dicomMicroscopyViewer', // what viewer.js reads, as from the package's UMD bundle
    target: 'es2020',
    minify: true,
    charset: 'ascii', // any page charset decodes it the same
    legalComments: 'external', // the packages' licence headers: dicomMicroscopyViewer.min.js.LEGAL.txt
    alias: { lodash: 'lodash-es' },
    // the library imports ol/ol.css, which its webpack build turned into a string it never
    // inserts: the page has never had those styles (viewer.css styles the controls)
    loader: { '.css': 'empty' },
    outfile,
    metafile: true,
    logLevel: 'error',
  })
  if (!quiet) {
    const out = result.metafile.outputs[Object.keys(result.metafile.outputs).find((k) => k.endsWith('.min.js'))]
    const modules = Object.keys(result.metafile.inputs).length
    console.log(`built ${outfile} (${(out.bytes / 1e6).toFixed(1)} MB from ${modules} modules)`)
  }
} catch (err) {
  // esbuild has printed what failed; one line for the log
  console.error(`viewer/build.mjs: dicom-microscopy-viewer not built: ${err.message.split('\n')[0]}`)
  process.exit(1)
}
