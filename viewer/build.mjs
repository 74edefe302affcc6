// `node viewer/build.mjs [--quiet]`: build dicom-microscopy-viewer for the page from the ES
// sources its npm package ships (src/), with esbuild, into viewer/build/ (git-ignored).
//
// Why not serve the package's dist/dicomMicroscopyViewer.bundle.min.js: it is compiled by babel
// for Internet Explorer 11 with the core-js runtime and all of lodash and mathjs (2.6 MB), and
// running it is most of the time before the first tile. Measured here (headless chromium, 2
// cores, the viewer page): the shipped bundle ran 1.3-1.8 s, this build (modern syntax, only
// what the library uses) 0.94-1.28 s, and the first tile came 0.4-1 s sooner (BENCHMARKS.md).
// Its decoder worker likewise (0.14 MB against the package's 1 MB), with the codecs beside it.
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
  const common = {
    absWorkingDir: here,
    bundle: true,
    target: 'es2020',
    minify: true,
    charset: 'ascii', // any page charset decodes it the same
    legalComments: 'external', // the packages' licence headers: *.LEGAL.txt
    metafile: true,
    logLevel: 'error',
  }
  const src = 'node_modules/dicom-microscopy-viewer/src/'
  const lib = await build({
    ...common,
    entryPoints: [src + 'dicom-microscopy-viewer.js'],
    format: 'iife',
    globalName: 'dicomMicroscopyViewer', // what viewer.js reads, as from the package's UMD bundle
    alias: { lodash: 'lodash-es' },
    // the library imports ol/ol.css, which its webpack build turned into a string it never
    // inserts: the page has never had those styles (viewer.css styles the controls)
    loader: { '.css': 'empty' },
    outfile,
  })
  // Its decoder worker, a module worker the library starts from PUBLIC_LIB_URL +
  // 'dataLoader.worker.min.js' (boot.js sets it to this folder), with the WebAssembly codecs
  // beside it under their own names (the worker fetches them relative to itself). The codecs'
  // Emscripten glue names Node's modules for Node only: left out.
  const worker = await build({
    ...common,
    entryPoints: [src + 'webWorker/dataLoader.worker.js'],
    format: 'esm',
    loader: { '.wasm': 'file' },
    assetNames: '[name]',
    external: ['fs', 'path', 'crypto', 'url', 'node:*'],
    outfile: join(here, 'build', 'dataLoader.worker.min.js'),
  })
  if (!quiet) {
    for (const result of [lib, worker]) {
      const [name, out] = Object.entries(result.metafile.outputs).find(([k]) => k.endsWith('.min.js'))
      const modules = Object.keys(result.metafile.inputs).length
      console.log(`built viewer/${name} (${(out.bytes / 1e6).toFixed(2)} MB from ${modules} modules)`)
    }
  }
} catch (err) {
  // esbuild has printed what failed; one line for the log
  console.error(`viewer/build.mjs: dicom-microscopy-viewer not built: ${err.message.split('\n')[0]}`)
  process.exit(1)
}
