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
import { HocuspocusProvider, HocuspocusProviderWebsocket } from '@hocuspocus/provider'
import { HocuspocusProvider as HocuspocusProviderV3 } from 'hocuspocus-provider-v3'
import { createHmac } from 'node:crypto'

const here = dirname(fileURLToPath(import.meta.url))
export const BIN = process.env.CONCORD_BIN ?? join(here, '..', '..', 'target', 'debug', 'concord')

let counter = 0
/** A fresh SQLite database URL, so a server can be restarted on the same file. */
export const freshSqlite = () => `sqlite://${join(mkdtempSync(join(tmpdir(), 'concord-interop-')), 'concord.db')}`

export const uniqueDoc = (prefix) => `${prefix}-${process.pid}-${Date.now()}-${counter++}`

/** Starts `concord serve` on a free port; resolves once it listens. */
export async function startServer ({ databaseUrl, env = {}, args = [] } = {}) {
  const db = databaseUrl ?? freshSqlite()
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
    hocuspocus: `ws://${addr}/hocuspocus`,
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

/**
 * An unmodified HocuspocusProvider (v4, or v3 with `v3: true`) on the
 * server's `/hocuspocus`, or on a shared `websocketProvider`.
 */
export function hocuspocus (server, name, { v3 = false, ...opts } = {}) {
  const Provider = v3 ? HocuspocusProviderV3 : HocuspocusProvider
  const socket = opts.websocketProvider ? {} : { url: server.hocuspocus, WebSocketPolyfill: WebSocket }
  const p = new Provider({ name, ...socket, ...opts })
  // A provider on a shared socket must be attached to it to send anything.
  if (opts.websocketProvider) p.attach()
  return p
}

/** One socket that several HocuspocusProviders share. */
export const hocuspocusSocket = (server) =>
  new HocuspocusProviderWebsocket({ url: server.hocuspocus, WebSocketPolyfill: WebSocket })

/** An HS256 JWT with the SPEC's claims, signed with `secret`. */
export function token (secret, claims) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString('base64url')
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ exp: Math.floor(Date.now() / 1000) + 3600, ...claims })}`
  return `${body}.${createHmac('sha256', secret).update(body).digest('base64url')}`
}

/** The document's stored state, read over HTTP into a fresh Y.Doc. */
export async function readOverHttp (server, doc, headers = {}) {
  const res = await fetch(`${server.http}/api/docs/${doc}`, { headers })
  if (!res.ok) throw new Error(`GET ${doc}: ${res.status} ${await res.text()}`)
  const ydoc = new Y.Doc()
  Y.applyUpdate(ydoc, new Uint8Array(await res.arrayBuffer()))
  return ydoc
}

export function destroyAll (...providers) {
  for (const p of providers) p.destroy()
}

/** A fresh PostgreSQL database (via psql), so suites never share state. */
export function freshPostgres () {
  const name = `concord_interop_${process.pid}_${Date.now()}_${counter++}`
  execFileSync('psql', ['-h', '127.0.0.1', '-U', 'postgres', '-d', 'postgres', '-qc', `CREATE DATABASE ${name}`])
  return `postgres://postgres@127.0.0.1:5432/${name}`
}
