#!/usr/bin/env node
// Makes sure the programs the tests run for real are installed: redis-server, nginx, Chromium,
// Prometheus (the metrics test scrapes with it) and Python's websockets package (the seed clients). `npm test` runs this first; `npm start` runs it
// for redis-server only (`node scripts/ensure-tools.mjs redis-server`).
//
// What is missing is installed with apt when this runs as root on Debian/Ubuntu (the packages'
// services are kept from starting: the tests run their own instances on free ports). Otherwise it
// stops at once with one line that names the exact command to run.
//
// For `npm test` (no argument) it also rebuilds tap's test class when it was built with other
// plugins than package.json's `tap.plugin` says, as after every `npm ci`: tap rebuilds it by itself,
// but the run that does so still starts its test files with the old build's loaders, TypeScript's
// among them, which compiles the plugin's files a second way (at other lines than the suite's
// esbuild hook, which the child processes use): that first run's coverage came out about 7 points
// lower than every later run's, on the same tree.
import { spawnSync } from 'node:child_process'
import { existsSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { dirname, join } from 'node:path'

const TOOLS = {
  'redis-server': { pkg: 'redis-server', present: () => onPath('redis-server') },
  nginx: { pkg: 'nginx-light', present: () => existsSync('/usr/sbin/nginx') || onPath('nginx') },
  chromium: { pkg: 'chromium', present: () => existsSync('/usr/bin/chromium') },
  'python3-websockets': { pkg: 'python3-websockets', present: () => spawnSync('/usr/bin/python3', ['-c', 'import websockets'], { stdio: 'ignore' }).status === 0 },
  prometheus: { pkg: 'prometheus', present: () => onPath('prometheus') }
}

function onPath (command) {
  return spawnSync('sh', ['-c', `command -v ${command}`], { stdio: 'ignore' }).status === 0
}

const wanted = process.argv.slice(2)
for (const name of wanted) {
  if (!(name in TOOLS)) {
    console.error(`ensure-tools: unknown tool "${name}" (known: ${Object.keys(TOOLS).join(', ')})`)
    process.exit(2)
  }
}
if (wanted.length === 0) await buildTap()

/** Rebuilds tap's test class (`tap build`, about 15 s) if its plugins are not the configured ones. */
async function buildTap () {
  const tapPackage = createRequire(join(process.cwd(), 'package.json')).resolve('tap/package.json')
  const fromRun = createRequire(createRequire(tapPackage).resolve('@tapjs/run/package.json'))
  const { TapConfig } = fromRun('@tapjs/config')
  const { signature } = fromRun('@tapjs/test')
  const config = await TapConfig.load()
  if (signature === config.pluginSignature) return
  console.log('Rebuilding tap with the plugins package.json names (once after an install)')
  const res = spawnSync(process.execPath, [join(dirname(tapPackage), JSON.parse(readFileSync(tapPackage, 'utf8')).bin.tap), 'build'], { stdio: 'inherit' })
  if (res.status !== 0) {
    console.error(`tap build failed (exit ${res.status}); run \`npx tap build\` and check its output.`)
    process.exit(1)
  }
}

const missing = (wanted.length > 0 ? wanted : Object.keys(TOOLS)).filter(name => !TOOLS[name].present())
if (missing.length === 0) process.exit(0)

const pkgs = missing.map(name => TOOLS[name].pkg)
const command = `apt-get install -y --no-install-recommends ${pkgs.join(' ')}`
const root = process.getuid?.() === 0
if (!root || !onPath('apt-get')) {
  const how = onPath('apt-get') ? `sudo apt-get update && sudo ${command}` : `install ${pkgs.join(', ')} with your package manager`
  console.error(`Missing ${missing.join(', ')} (needed to run the tests against real servers): run \`${how}\` and try again.`)
  process.exit(1)
}

console.log(`Installing what this project needs and this machine lacks, with apt: ${pkgs.join(' ')}`)
const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' }
// A policy-rc.d that says "no" keeps the packages' daemons (Redis on 6379, nginx on 80) from
// being started by the install; nothing of ours uses them.
const policy = '/usr/sbin/policy-rc.d'
const ownPolicy = !existsSync(policy)
if (ownPolicy) writeFileSync(policy, '#!/bin/sh\nexit 101\n', { mode: 0o755 })
try {
  for (const args of [['update', '-qq'], ['install', '-y', '-qq', '--no-install-recommends', ...pkgs]]) {
    const res = spawnSync('apt-get', args, { env, stdio: ['ignore', 'ignore', 'inherit'] })
    if (res.status !== 0) {
      console.error(`apt-get ${args[0]} failed (exit ${res.status}); run \`${command}\` yourself and try again.`)
      process.exit(1)
    }
  }
} finally {
  if (ownPolicy) rmSync(policy, { force: true })
}
const still = missing.filter(name => !TOOLS[name].present())
if (still.length > 0) {
  console.error(`Still missing after the install: ${still.join(', ')}; run \`${command}\` and check its output.`)
  process.exit(1)
}
console.log(`Installed: ${pkgs.join(' ')}`)
