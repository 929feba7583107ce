'use strict'

module.exports = [
  ...require('neostandard')({
    ts: true,
    ignores: ['dist/**', 'build/**', 'coverage/**', '.tap/**', 'bench/results/**', 'test/types/**']
  }),
  // `void promise` marks a promise whose errors are handled inside it (fire and forget, on purpose).
  { rules: { 'no-void': ['error', { allowAsStatement: true }] } }
]
