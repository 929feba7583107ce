import t from 'tap'
import { build } from 'esbuild'
import { join } from 'node:path'
import { buildApp } from '../example/app'
import { redisFor, startWorker, tempDir } from './helpers/index'
import { launchChromium } from './helpers/browser'

// React in real Chromium: seed 000's own hook, unchanged but for its host, and this package's
// useJobProgress/useUpload, side by side on one page against the example app.

/** Seed 000's hook as the seed wrote it; only `localhost:8001` becomes the test server. */
const SEED_HOOK = `
import { useEffect, useState } from 'react';
export function useBatchProgress(jobId) {
  const [progress, setProgress] = useState(null);
  const [error, setError] = useState(null);
  useEffect(() => {
    const ws = new WebSocket(\`ws://\${location.host}/ws/batch/\${jobId}\`);
    ws.onmessage = (event) => {
      const data = JSON.parse(event.data);
      setProgress(data);
      if (data.status !== 'processing') {
        ws.close();
      }
    };
    ws.onerror = () => {
      setError('WebSocket connection error');
    };
    const interval = setInterval(() => {
      if (ws.readyState === WebSocket.OPEN) {
        ws.send('ping');
      }
    }, 30000);
    return () => {
      clearInterval(interval);
      ws.close();
    };
  }, [jobId]);
  return { progress, error };
}
`

const APP = `
import { createElement as h, useState } from 'react';
import { createRoot } from 'react-dom/client';
import { JobProgressClient } from ${JSON.stringify(join(__dirname, '..', 'client', 'index.ts'))};
import { JobProgressProvider, useJobProgress, useUpload } from ${JSON.stringify(join(__dirname, '..', 'client', 'react.ts'))};
import { useBatchProgress } from './seed-hook.js';

function Seed ({ jobId }) {
  const { progress, error } = useBatchProgress(jobId);
  return h('p', { id: 'seed' }, error ?? (progress ? progress.status + ' ' + progress.progress + '% ' + progress.processed + '/' + progress.total : 'waiting'));
}
function Ours ({ jobId }) {
  const { update, error, done } = useJobProgress('batch', jobId);
  return h('p', { id: 'ours', 'data-done': String(done) }, error ? error.name : update ? update.status + ' ' + update.progress + '% ' + JSON.stringify(update.result) : 'waiting');
}
function App () {
  const { upload, loaded, total, job } = useUpload('batch');
  return h('div', null,
    h('button', { id: 'go', onClick: () => upload(new Blob(['a\\nb\\nc\\nd\\n']), { filename: 'r.txt' }) }, 'upload'),
    h('p', { id: 'sent' }, loaded + '/' + total),
    job && h(Seed, { jobId: job.jobId }),
    job && h(Ours, { jobId: job.jobId }));
}
createRoot(document.getElementById('root')).render(h(JobProgressProvider, { client: new JobProgressClient({ wsPath: '/api/v1/ws/jobs' }) }, h(App)));
`

t.test('seed 000 React hook and useJobProgress/useUpload on one page', async (t) => {
  const out = await build({
    stdin: { contents: APP, resolveDir: __dirname, loader: 'js' },
    bundle: true,
    format: 'esm',
    platform: 'browser',
    write: false,
    define: { 'process.env.NODE_ENV': '"production"' },
    logLevel: 'silent',
    plugins: [{ name: 'seed-hook', setup (b) { b.onResolve({ filter: /^\.\/seed-hook\.js$/ }, () => ({ path: 'seed-hook', namespace: 'seed' })); b.onLoad({ filter: /.*/, namespace: 'seed' }, () => ({ contents: SEED_HOOK, loader: 'js', resolveDir: __dirname })) } }]
  })
  const bundle = out.outputFiles[0].text
  const redis = await redisFor(t)
  const uploadDir = await tempDir(t)
  const app = await buildApp({ redisUrl: redis.url, sessionSecret: 'a-browser-test-secret-0123456789', uploadDir, plugin: { throttleMs: 0 } })
  app.get('/react', async (_req, reply) => await reply.type('text/html').send('<!doctype html><div id="root"></div><script type="module" src="/react.js"></script>'))
  app.get('/react.js', async (_req, reply) => await reply.type('text/javascript').send(bundle))
  await app.listen({ port: 0, host: '127.0.0.1' })
  t.teardown(async () => await app.close())
  const origin = `http://127.0.0.1:${(app.server.address() as { port: number }).port}`
  startWorker(t, redis, 'batch', uploadDir, { delayMs: 50 })

  const browser = await launchChromium(t)
  const page = await browser.newPage()
  const errors: string[] = []
  page.on('pageerror', e => errors.push(e.message))
  await page.goto(`${origin}/react`)
  await page.click('#go')
  await page.waitForSelector('#ours[data-done=true]', { timeout: 20_000 })
  t.equal(await page.textContent('#ours'), 'succeeded 100% {"lines":4}')
  await page.waitForFunction(() => document.getElementById('seed')?.textContent?.startsWith('complete'), undefined, { timeout: 20_000 })
  t.equal(await page.textContent('#seed'), 'complete 100% 4/4', 'the seed hook works unchanged')
  t.match(await page.textContent('#sent'), /^(\d+)\/\1$/, 'upload progress reached the total')
  t.same(errors, [])
})

const TWO = `
import { createElement as h, useState } from 'react';
import { createRoot } from 'react-dom/client';
import { JobProgressClient } from ${JSON.stringify(join(__dirname, '..', 'client', 'index.ts'))};
import { JobProgressProvider, useJobProgress, useUpload } from ${JSON.stringify(join(__dirname, '..', 'client', 'react.ts'))};

function Ours ({ id, jobId }) {
  const { update, done } = useJobProgress('batch', jobId);
  return h('p', { id, 'data-done': String(done) }, update ? update.status + ' ' + update.processed : 'waiting');
}
function App () {
  const { upload, job } = useUpload('batch');
  const [first, setFirst] = useState(true);
  return h('div', null,
    h('button', { id: 'go', onClick: () => upload(new Blob(['a\\nb\\nc\\n']), { filename: 'r.txt' }) }, 'upload'),
    h('button', { id: 'hide', onClick: () => setFirst(false) }, 'hide'),
    job && first && h(Ours, { id: 'first', jobId: job.jobId }),
    job && h(Ours, { id: 'second', jobId: job.jobId }));
}
createRoot(document.getElementById('root')).render(h(JobProgressProvider, { client: new JobProgressClient({ wsPath: '/api/v1/ws/jobs' }) }, h(App)));
`

t.test('two components watching one job share its watch: the first to unmount leaves the other live', async (t) => {
  const out = await build({ stdin: { contents: TWO, resolveDir: __dirname, loader: 'js' }, bundle: true, format: 'esm', platform: 'browser', write: false, define: { 'process.env.NODE_ENV': '"production"' }, logLevel: 'silent' })
  const bundle = out.outputFiles[0].text
  const redis = await redisFor(t)
  const uploadDir = await tempDir(t)
  const app = await buildApp({ redisUrl: redis.url, sessionSecret: 'a-browser-test-secret-0123456789', uploadDir, plugin: { throttleMs: 0 } })
  app.get('/two', async (_req, reply) => await reply.type('text/html').send('<!doctype html><div id="root"></div><script type="module" src="/two.js"></script>'))
  app.get('/two.js', async (_req, reply) => await reply.type('text/javascript').send(bundle))
  await app.listen({ port: 0, host: '127.0.0.1' })
  t.teardown(async () => await app.close())
  const origin = `http://127.0.0.1:${(app.server.address() as { port: number }).port}`
  // The job waits at its second item until the first component is gone.
  let release = (): void => {}
  const held = new Promise<void>(resolve => { release = resolve })
  startWorker(t, redis, 'batch', uploadDir, { beforeItem: async (i) => { if (i === 1) await held } })

  const browser = await launchChromium(t)
  const page = await browser.newPage()
  await page.goto(`${origin}/two`)
  await page.click('#go')
  for (const id of ['first', 'second']) await page.waitForFunction((id) => document.getElementById(id)?.textContent === 'running 1', id, { timeout: 20_000 })
  await page.click('#hide')
  await page.waitForSelector('#first', { state: 'detached' })
  release()
  await page.waitForSelector('#second[data-done=true]', { timeout: 20_000 })
  t.equal(await page.textContent('#second'), 'succeeded 3', 'the other component saw the job to its end')
})
