import Fastify from 'fastify'
import { expect, test } from 'tstyche'
import jobProgress, { createJobWorker, defineProtocol, errors, jobsProtocol, type JobEvent, type JobProgress, type JobContext } from '../../dist/index.js'

test('registers with typed options', () => {
  const app = Fastify()
  expect(app.register(jobProgress, { kinds: { batch: {} } })).type.not.toRaiseError()
  expect(app.register(jobProgress, { kinds: { batch: { accept: ['.csv'], maxFileSize: 1024 } }, session: { secret: 'x'.repeat(32) }, throttleMs: 50 })).type.not.toRaiseError()
  expect(app.register(jobProgress, { kinds: { batch: {} }, throttleMs: 'fast' })).type.toRaiseError()
  expect(app.register(jobProgress, { kinds: { batch: {} }, getOwner: async (request) => request.headers['x-user'] as string })).type.not.toRaiseError()
})

test('decorates the instance', () => {
  const app = Fastify()
  expect(app.jobProgress).type.toBe<JobProgress>()
  expect(app.jobProgress.getJob('batch', 'id')).type.toBe<ReturnType<JobProgress['getJob']>>()
  expect(app.jobProgress.instanceId).type.toBe<string>()
})

test('errors are constructors users can instanceof', () => {
  const err: unknown = new errors.JobNotFoundError()
  if (err instanceof errors.JobNotFoundError) expect(err.code).type.toBe<'FST_JP_JOB_NOT_FOUND'>()
})

test('protocols and workers are typed', () => {
  expect(defineProtocol({ name: 'x', path: '/x', render: (event: JobEvent) => ({ state: event.state }) })).type.not.toRaiseError()
  expect(defineProtocol({ name: 'x', path: '/x' })).type.toRaiseError()
  expect(jobsProtocol({ path: '/api/v1/ws/jobs' }).path).type.toBe<string>()
  expect(createJobWorker({ kind: 'batch' }, async (ctx: JobContext) => {
    await ctx.report(1, 2)
    return ctx.file.size
  })).type.not.toRaiseError()
})
