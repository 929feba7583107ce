import t from 'tap'
import { spawn } from 'node:child_process'
import { existsSync, readFileSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { eventually, tempDir } from './helpers/index'

// The end-of-run leak check itself, on a registry of its own (never the run's): a test process
// that dies by SIGKILL cannot clean up, so what it started must be found, stopped and reported.
const ROOT = resolve(__dirname, '..')

async function node (args: string[], env: NodeJS.ProcessEnv): Promise<{ code: number | null, signal: string | null, output: string }> {
  const child = spawn(process.execPath, ['--import', 'tsx', ...args], { cwd: ROOT, env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] })
  let output = ''
  child.stdout.on('data', (c: Buffer) => { output += c.toString() })
  child.stderr.on('data', (c: Buffer) => { output += c.toString() })
  return await new Promise(resolve => child.once('exit', (code, signal) => resolve({ code, signal, output })))
}

/** Running (not gone, not a zombie waiting to be reaped). */
const running = (pid: number): boolean => {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
    return stat.slice(stat.lastIndexOf(')') + 2)[0] !== 'Z'
  } catch {
    return false
  }
}

t.test('a test killed outright leaves a redis-server and temp dirs: the check stops them and fails the run', async (t) => {
  const registry = await tempDir(t, 'jp-registry-')
  const env = { JP_TEST_REGISTRY: registry }
  const victim = `
    const { RedisServer } = require('./test/helpers/redis')
    RedisServer.start().then((r) => {
      console.log(JSON.stringify({ dir: r.dir }))
      process.kill(process.pid, 'SIGKILL')
    })`
  const died = await node(['-e', victim], env)
  t.equal(died.signal, 'SIGKILL', 'the test process died without any cleanup')
  const { dir } = JSON.parse(died.output.trim().split('\n')[0]) as { dir: string }
  t.ok(existsSync(dir), "the dead process's temp dir is still there")

  const check = await node([join('test', 'global', 'after.ts')], env)
  t.equal(check.code, 1, 'the check fails the run')
  t.match(check.output, /Leak check: the tests left 2 thing\(s\) behind/)
  t.match(check.output, /process \d+ still running: redis-server --port/)
  t.match(check.output, /temp directory left: .*jp-redis-/)
  const pid = Number(/process (\d+) still running/.exec(check.output)?.[1])
  t.ok(await eventually(() => !running(pid)), 'the redis-server was stopped')
  t.notOk(existsSync(dir), 'the temp dir was removed')

  const again = await node([join('test', 'global', 'after.ts')], env)
  t.equal(again.code, 0, 'a clean registry passes')
  t.match(again.output, /no process or temp directory left/)
})

t.test('an interrupted test (SIGINT) stops what it started on its way out', async (t) => {
  const registry = await tempDir(t, 'jp-registry-')
  const env = { JP_TEST_REGISTRY: registry }
  const victim = `
    const { RedisServer } = require('./test/helpers/redis')
    RedisServer.start().then((r) => {
      console.log(JSON.stringify({ dir: r.dir, port: r.port }))
      process.kill(process.pid, 'SIGINT')
      setTimeout(() => {}, 10000)
    })`
  const died = await node(['-e', victim], env)
  t.equal(died.signal, 'SIGINT', 'the process ended by the signal')
  const { dir } = JSON.parse(died.output.trim().split('\n')[0]) as { dir: string }
  t.notOk(existsSync(dir), 'its temp dir is gone')
  const check = await node([join('test', 'global', 'after.ts')], env)
  t.equal(check.code, 0, 'nothing left for the check to find')
})

t.test('a run going on beside this one in the same worktree: the check leaves its live test process\'s servers alone', async (t) => {
  const registry = await tempDir(t, 'jp-registry-')
  const env = { JP_TEST_REGISTRY: registry }
  // A test process of the other run, still at work: it holds a redis-server and waits.
  const other = spawn(process.execPath, ['--import', 'tsx', '-e', `
    const { RedisServer } = require('./test/helpers/redis')
    RedisServer.start().then((r) => { console.log(JSON.stringify({ dir: r.dir })) })
    process.stdin.resume()
    process.stdin.on('end', () => process.exit(0))`], { cwd: ROOT, env: { ...process.env, ...env }, stdio: ['pipe', 'pipe', 'inherit'] })
  const exited = new Promise(resolve => other.once('exit', resolve))
  t.teardown(async () => { other.stdin.end(); await exited })
  const [line] = await new Promise<string[]>(resolve => other.stdout.once('data', (c: Buffer) => resolve(c.toString().split('\n'))))
  const { dir } = JSON.parse(line) as { dir: string }

  const check = await node([join('test', 'global', 'after.ts')], env)
  t.equal(check.code, 0, 'not a leak of this run')
  t.ok(existsSync(dir), 'the other run\'s redis-server keeps its directory')

  // Once that process has ended (cleanly here), nothing is left either.
  other.stdin.end()
  await exited
  const after = await node([join('test', 'global', 'after.ts')], env)
  t.equal(after.code, 0)
  t.notOk(existsSync(dir))
})
