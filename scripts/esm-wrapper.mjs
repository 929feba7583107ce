// Writes dist/index.mjs and dist/index.d.mts: an ES module facade over the CommonJS build, so
// ESM and CommonJS apps share ONE copy of the plugin (one set of error classes for instanceof).
import { createRequire } from 'node:module'
import { writeFileSync } from 'node:fs'

const require = createRequire(import.meta.url)
const cjs = require('../dist/index.js')
const names = Object.keys(cjs).filter(n => n !== 'default' && n !== '__esModule')
writeFileSync(new URL('../dist/index.mjs', import.meta.url),
  `import cjs from './index.js'\nexport default cjs.default\nexport const { ${names.join(', ')} } = cjs\n`)
// index.d.ts types a CommonJS module: an ES module importing it gets module.exports as its default,
// so the default is typed as what the facade exports, the plugin, not re-exported from there.
writeFileSync(new URL('../dist/index.d.mts', import.meta.url),
  'import cjs from \'./index.js\'\nexport * from \'./index.js\'\ndeclare const jobProgress: typeof cjs.default\nexport default jobProgress\n')
