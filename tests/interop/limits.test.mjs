// The limits, seen by Node's `ws` client as a browser would see them: the
// close code must arrive, even while the client is still sending.
import { test, after } from 'node:test'
import assert from 'node:assert/strict'
import WebSocket from 'ws'
import { startServer, provider, until, synced, uniqueDoc, destroyAll } from './harness.mjs'

const server = await startServer()
after(() => server.stop())

/** Opens a raw socket on `doc`; resolves with it once open. */
function open (doc) {
  const ws = new WebSocket(`${server.url}/${doc}`)
  ws.binaryType = 'nodebuffer'
  const closed = new Promise((resolve) => ws.on('close', (code, reason) => resolve({ code, reason: reason.toString() })))
  ws.on('error', () => {})
  return new Promise((resolve, reject) => {
    ws.once('open', () => resolve({ ws, closed }))
    ws.once('error', reject)
  })
}

const within = (promise, ms, what) => Promise.race([
  promise,
  new Promise((_resolve, reject) => setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms))
])

test('a message over 16 MiB sent in one go closes with 1009, not a reset', async () => {
  const doc = uniqueDoc('too-big')
  const bystander = provider(server, doc)
  await synced(bystander)
  bystander.doc.getText('t').insert(0, 'intact')
  const { ws, closed } = await open(doc)
  const frame = Buffer.alloc(17 * 1024 * 1024)
  frame[0] = 0
  frame[1] = 2
  ws.send(frame)
  const { code } = await within(closed, 15000, 'the close')
  assert.equal(code, 1009)
  // The room and its other client go on.
  bystander.doc.getText('t').insert(6, '!')
  const late = provider(server, doc)
  await until(() => late.doc.getText('t').toString() === 'intact!', 'a late joiner sees the edits')
  destroyAll(bystander, late)
})

test('a client flooding past the rate limit closes with 1008 "rate limit"', async () => {
  const doc = uniqueDoc('flood')
  const { ws, closed } = await open(doc)
  // 1,000 burst + 200/s: 3,000 query-awareness messages at once exceed it.
  for (let i = 0; i < 3000; i++) ws.send(Buffer.from([3]))
  const { code, reason } = await within(closed, 15000, 'the close')
  assert.equal(code, 1008)
  assert.equal(reason, 'rate limit')
})
