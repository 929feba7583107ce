import { execFile, spawn, type ChildProcess } from 'node:child_process'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { Cluster, Redis } from 'ioredis'
import { slotOf } from '../../lib/core/slot'
import { answers, freePort } from './redis'

const run = promisify(execFile)

interface Teardown { teardown: (fn: () => unknown) => void }

/** Every node still running, so that a crashed test run leaves no process behind. */
const live = new Set<ChildProcess>()
process.once('exit', () => {
  for (const child of live) child.kill('SIGKILL')
})

/**
 * A private Redis Cluster made of real redis-servers: 3 masters and 3 replicas on free ports,
 * each in a directory of its own, all removed at teardown. Fault tests kill a master and wait
 * for its replica to take over.
 */
export class RedisCluster {
  readonly ports: number[]
  readonly dir: string
  readonly #procs = new Map<number, ChildProcess>()

  private constructor (ports: number[], dir: string) {
    this.ports = ports
    this.dir = dir
  }

  /**
   * `replicas: 0` makes 3 masters alone and `persist: false` turns the append-only file off (the
   * bench: an fsync per write would measure the disk).
   */
  static async start (t: Teardown, opts: { replicas?: 0 | 1, persist?: boolean } = {}): Promise<RedisCluster> {
    const replicas = opts.replicas ?? 1
    const ports: number[] = []
    while (ports.length < 3 * (1 + replicas)) {
      const port = await freePort()
      // The cluster bus listens on port + 10000: keep both free and distinct.
      if (port < 55000 && !ports.includes(port)) ports.push(port)
    }
    const cluster = new RedisCluster(ports, await mkdtemp(join(tmpdir(), 'jp-cluster-')))
    t.teardown(async () => await cluster.stop())
    for (const port of ports) cluster.#spawn(port, opts.persist ?? true)
    await Promise.all(ports.map(async port => await cluster.#waitUp(port)))
    await run('redis-cli', ['--cluster', 'create', ...ports.map(p => `127.0.0.1:${p}`), '--cluster-replicas', String(replicas), '--cluster-yes'], { timeout: 30_000 })
    await cluster.waitHealthy()
    await cluster.waitReplicasSynced()
    return cluster
  }

  /**
   * Waits until every live replica finished its first sync. A replica that never synced does not
   * fail over (it counts its data as too old), so a master killed before that stays down and the
   * cluster answers CLUSTERDOWN for good.
   */
  async waitReplicasSynced (timeoutMs = 30_000): Promise<void> {
    const deadline = Date.now() + timeoutMs
    for (;;) {
      let ok = true
      for (const port of this.ports) {
        if (!this.alive(port)) continue
        const node = this.node(port)
        try {
          const info = await node.info('replication')
          if (info.includes('role:slave') && !info.includes('master_link_status:up')) ok = false
        } catch {
          ok = false
        } finally {
          node.disconnect()
        }
      }
      if (ok) return
      if (Date.now() > deadline) throw new Error('the replicas did not finish their first sync')
      await new Promise(resolve => setTimeout(resolve, 100))
    }
  }

  /** Waits until a live master other than `port` owns the key's slot (a replica took over). */
  async waitFailover (key: string, port: number, timeoutMs = 30_000): Promise<number> {
    const deadline = Date.now() + timeoutMs
    for (;;) {
      try {
        const owner = await this.masterOf(key)
        if (owner !== port && this.alive(owner)) return owner
      } catch {}
      if (Date.now() > deadline) throw new Error(`no replica took over the slot of ${key}; the cluster as a live node sees it:\n${await this.#nodesView()}`)
      await new Promise(resolve => setTimeout(resolve, 100))
    }
  }

  /** CLUSTER NODES as the first live node answers it, for error messages. */
  async #nodesView (): Promise<string> {
    for (const port of this.ports) {
      if (!this.alive(port)) continue
      const node = this.node(port)
      try {
        return await node.cluster('NODES') as string
      } catch {} finally {
        node.disconnect()
      }
    }
    return '(no live node answers)'
  }

  #spawn (port: number, persist: boolean): void {
    const proc = spawn('redis-server', [
      '--port', String(port), '--bind', '127.0.0.1', '--dir', this.dir,
      '--cluster-enabled', 'yes', '--cluster-config-file', `nodes-${port}.conf`, '--cluster-node-timeout', '1500',
      '--save', '', '--appendonly', persist ? 'yes' : 'no', '--appendfilename', `aof-${port}.aof`, '--appenddirname', `aof-${port}`,
      '--daemonize', 'no', '--loglevel', 'warning'
    ], { stdio: 'ignore' })
    live.add(proc)
    proc.once('exit', () => live.delete(proc))
    this.#procs.set(port, proc)
  }

  async #waitUp (port: number): Promise<void> {
    if (!await answers(port)) throw new Error(`cluster node on ${port} did not start`)
  }

  /** Whether the node on a port still runs. */
  alive (port: number): boolean {
    const proc = this.#procs.get(port)
    return proc !== undefined && proc.exitCode === null && proc.signalCode === null
  }

  /** Seed nodes for clients. */
  get nodes (): Array<{ host: string, port: number }> {
    return this.ports.map(port => ({ host: '127.0.0.1', port }))
  }

  /** A cluster client (the caller closes it); sharded subscribers on. */
  client (): Cluster {
    const cluster = new Cluster(this.nodes, { shardedSubscribers: true, redisOptions: { maxRetriesPerRequest: null }, slotsRefreshTimeout: 2_000 })
    cluster.on('error', () => {})
    return cluster
  }

  /** A plain client on one node (the caller closes it). */
  node (port: number): Redis {
    const redis = new Redis(port, '127.0.0.1', { maxRetriesPerRequest: 1, retryStrategy: () => null })
    redis.on('error', () => {})
    return redis
  }

  /** The port of the live master that owns a key's slot now. */
  async masterOf (key: string): Promise<number> {
    return await this.masterOfSlot(slotOf(key))
  }

  /** The id of the node on a port (CLUSTER MYID). */
  async idOf (port: number): Promise<string> {
    const node = this.node(port)
    try {
      return await node.cluster('MYID') as string
    } finally {
      node.disconnect()
    }
  }

  /** The ports of the live masters. */
  async masters (): Promise<number[]> {
    const out = new Set<number>()
    for (const port of this.ports) {
      if (!this.alive(port)) continue
      const node = this.node(port)
      try {
        const slots = await node.cluster('SLOTS') as unknown as Array<[number, number, [string, number]]>
        for (const [, , master] of slots) out.add(Number(master[1]))
        break
      } catch {} finally {
        node.disconnect()
      }
    }
    return [...out].filter(port => this.alive(port))
  }

  /**
   * Moves one slot to another master the way a resharding does: the target imports it, the source
   * migrates it, its keys are MIGRATEd in batches, then the slot is given to the target (the
   * target first, then the source, which drops its shard channel subscribers with a
   * `sunsubscribe`). `tellOthers` false leaves the other masters to learn it by gossip, as a
   * resharding tool that only tells the two nodes does.
   */
  async migrateSlot (slot: number, to: number, opts: { tellOthers?: boolean, beforeHandOver?: () => Promise<void> } = {}): Promise<void> {
    const from = await this.masterOfSlot(slot)
    if (from === to) throw new Error(`slot ${slot} is already on ${to}`)
    const [fromId, toId] = await Promise.all([this.idOf(from), this.idOf(to)])
    const source = this.node(from)
    const target = this.node(to)
    try {
      await target.cluster('SETSLOT', slot, 'IMPORTING', fromId)
      await source.cluster('SETSLOT', slot, 'MIGRATING', toId)
      for (;;) {
        const keys = await source.cluster('GETKEYSINSLOT', slot, 100) as string[]
        if (keys.length === 0) break
        await source.call('MIGRATE', '127.0.0.1', to, '', 0, 10_000, 'KEYS', ...keys)
      }
      await opts.beforeHandOver?.()
      await target.cluster('SETSLOT', slot, 'NODE', toId)
      await source.cluster('SETSLOT', slot, 'NODE', toId)
      if (opts.tellOthers !== false) {
        for (const port of await this.masters()) {
          if (port === from || port === to) continue
          const other = this.node(port)
          try {
            await other.cluster('SETSLOT', slot, 'NODE', toId)
          } finally {
            other.disconnect()
          }
        }
      }
    } finally {
      source.disconnect()
      target.disconnect()
    }
  }

  /** Waits until every live node, replicas included, names `to` as the owner of the slot. */
  async waitSlotOwner (slot: number, to: number, timeoutMs = 20_000): Promise<void> {
    const deadline = Date.now() + timeoutMs
    for (;;) {
      let ok = true
      for (const port of this.ports) {
        if (!this.alive(port)) continue
        if (await this.masterOfSlot(slot, port) !== to) ok = false
      }
      if (ok) return
      if (Date.now() > deadline) throw new Error(`not every node sees slot ${slot} on ${to}`)
      await new Promise(resolve => setTimeout(resolve, 100))
    }
  }

  /** The port of the master that owns a slot, as one node (or the first live one) sees it. */
  async masterOfSlot (slot: number, askPort?: number): Promise<number> {
    for (const port of askPort === undefined ? this.ports : [askPort]) {
      if (!this.alive(port)) continue
      const node = this.node(port)
      try {
        const slots = await node.cluster('SLOTS') as unknown as Array<[number, number, [string, number]]>
        for (const [from, to, master] of slots) if (slot >= from && slot <= to) return Number(master[1])
      } catch {} finally {
        node.disconnect()
      }
    }
    throw new Error(`no live node knows slot ${slot}`)
  }

  /** Waits until every live node reports the cluster healthy. */
  async waitHealthy (timeoutMs = 20_000): Promise<void> {
    const deadline = Date.now() + timeoutMs
    for (;;) {
      let ok = true
      for (const port of this.ports) {
        if (!this.alive(port)) continue
        const node = this.node(port)
        try {
          const info = await node.cluster('INFO') as string
          if (!info.includes('cluster_state:ok')) ok = false
        } catch {
          ok = false
        } finally {
          node.disconnect()
        }
      }
      if (ok) return
      if (Date.now() > deadline) throw new Error('the cluster did not become healthy')
      await new Promise(resolve => setTimeout(resolve, 100))
    }
  }

  /** SIGKILLs a node (a master: its replica takes over after the node timeout). */
  async kill (port: number): Promise<void> {
    const proc = this.#procs.get(port)
    if (proc === undefined || proc.exitCode !== null) return
    const exited = new Promise(resolve => proc.once('exit', resolve))
    proc.kill('SIGKILL')
    await exited
  }

  async stop (): Promise<void> {
    await Promise.all([...this.#procs.values()].map(async proc => {
      if (proc.exitCode !== null || proc.signalCode !== null) return
      const exited = new Promise(resolve => proc.once('exit', resolve))
      proc.kill('SIGKILL')
      await exited
    }))
    await rm(this.dir, { recursive: true, force: true })
  }
}
