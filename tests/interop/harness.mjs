// Starts real `concord` processes and real y-websocket providers for the
// interop tests. Every wait is bounded.
import { spawn, execFileSync } from 'node:child_process'
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, dirname } from 'node:path'
import { fileURLToPath } from 'node:url'
import { createInterface } from 'node:readline'
import WebSocket from 'ws'
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'

const here = dirname(fileURLToPath(import.meta.url))
export const BIN = process.env.CONCORD_BIN ?? join(here, '..', '..', 'target', 'debug', 'concord')

let counter = 0
export const uniqueDoc = (prefix) => `${prefix}-${process.pid}-${Date.now()}-${counter++}`

/** Starts `concord serve` on a free port; resolves once it listens. */
export async function startServer ({ databaseUrl, env = {}, args = [] } = {}) {
  const db = databaseUrl ?? `sqlite://${join(mkdtempSync(join(tmpdir(), 'concord-interop-')), 'concord.db')}`
  const childEnv = { ...process.env, RUST_LOG: 'warn', ...env }
  for (const key of ['CONCORD_JWT_SECRET', 'REDIS_URL', 'DATABASE_URL']) {
    if (!(key in env)) delete childEnv[key]
  }
  const child = spawn(BIN, ['serve', '--bind', '127.0.0.1:0', '--database-url', db, ...args], {
    env: childEnv,
    stdio: ['ignore', 'pipe', 'inherit']
  })
  const addr = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('concord did not start')), 30000)
    child.once('exit', (code) => reject(new Error(`concord exited with ${code}`)))
    createInterface({ input: child.stdout }).on('line', (line) => {
      const m = line.match(/^concord listening on (.+)$/)
      if (m) { clearTimeout(timer); resolve(m[1]) }
    })
  })
  return {
    child,
    url: `ws://${addr}/ws`,
    http: `http://${addr}`,
    stop: () => new Promise((resolve) => {
      if (child.exitCode !== null) return resolve()
      child.once('exit', resolve)
      child.kill('SIGKILL')
    })
  }
}

/**
 * An unmodified WebsocketProvider. `disableBc`: Node 20 has a global
 * BroadcastChannel, and providers in one process would otherwise sync with
 * each other behind the server's back.
 */
export function provider (server, doc, ydoc = new Y.Doc(), opts = {}) {
  const p = new WebsocketProvider(server.url, doc, ydoc, {
    WebSocketPolyfill: WebSocket,
    disableBc: true,
    ...opts
  })
  // provider.destroy() leaves the Awareness it created (and its timer) alive,
  // which would keep the test process from exiting.
  const destroy = p.destroy.bind(p)
  p.destroy = () => { destroy(); p.awareness.destroy() }
  return p
}

/** Resolves when `pred()` holds, checking on every doc/awareness change and on a short poll. */
export function until (pred, what = 'condition', ms = 15000) {
  return new Promise((resolve, reject) => {
    const started = Date.now()
    const check = () => {
      let ok = false
      try { ok = pred() } catch (e) { return reject(e) }
      if (ok) return resolve()
      if (Date.now() - started > ms) return reject(new Error(`timed out waiting for ${what}`))
      setTimeout(check, 10)
    }
    check()
  })
}

export const synced = (p) => until(() => p.synced, 'sync')

export function destroyAll (...providers) {
  for (const p of providers) p.destroy()
}

/** A fresh PostgreSQL database (via psql), so suites never share state. */
export function freshPostgres () {
  const name = `concord_interop_${process.pid}_${Date.now()}_${counter++}`
  execFileSync('psql', ['-h', '127.0.0.1', '-U', 'postgres', '-d', 'postgres', '-qc', `CREATE DATABASE ${name}`])
  return `postgres://postgres@127.0.0.1:5432/${name}`
}
