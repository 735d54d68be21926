// The real @hocuspocus/provider (v4, and v3) against concord's /hocuspocus.
import { test, after } from 'node:test'
import assert from 'node:assert/strict'
import * as Y from 'yjs'
import {
  startServer, provider, hocuspocus, hocuspocusSocket, token, readOverHttp, freshSqlite,
  until, synced, uniqueDoc, destroyAll
} from './harness.mjs'

const server = await startServer()
const secret = 'interop-hocuspocus-secret'
const authed = await startServer({ env: { CONCORD_JWT_SECRET: secret } })
after(() => Promise.all([server.stop(), authed.stop()]))

const text = (p) => p.document.getText('t').toString()

for (const v3 of [false, true]) {
  test(`v${v3 ? 3 : 4} providers converge, and a late joiner gets everything`, async () => {
    const doc = uniqueDoc(`hp/v${v3 ? 3 : 4}`)
    const a = hocuspocus(server, doc, { v3 })
    const b = hocuspocus(server, doc, { v3 })
    await Promise.all([synced(a), synced(b)])
    a.document.getText('t').insert(0, 'hello')
    b.document.getMap('m').set('k', 42)
    await until(() => text(b) === 'hello', 'text on b')
    await until(() => a.document.getMap('m').get('k') === 42, 'map on a')
    for (let i = 0; i < 50; i++) b.document.getText('t').insert(5 + i, '!')
    await until(() => text(a) === 'hello' + '!'.repeat(50), 'appends on a')
    const late = hocuspocus(server, doc, { v3 })
    await synced(late)
    await until(() => text(late) === 'hello' + '!'.repeat(50), 'late joiner')
    assert.equal(late.document.getMap('m').get('k'), 42)
    destroyAll(a, b, late)
  })
}

test('a v3 and a v4 provider share a document', async () => {
  const doc = uniqueDoc('hp/v3v4')
  const old = hocuspocus(server, doc, { v3: true })
  const cur = hocuspocus(server, doc)
  await Promise.all([synced(old), synced(cur)])
  old.document.getText('t').insert(0, 'three')
  await until(() => text(cur) === 'three', 'v3 -> v4')
  cur.document.getText('t').insert(5, '+four')
  await until(() => text(old) === 'three+four', 'v4 -> v3')
  destroyAll(old, cur)
})

test('awareness appears and disappears', async () => {
  const doc = uniqueDoc('hp/presence')
  const a = hocuspocus(server, doc)
  const b = hocuspocus(server, doc)
  await Promise.all([synced(a), synced(b)])
  a.setAwarenessField('user', { name: 'ada' })
  const aId = a.document.clientID
  await until(() => b.awareness.getStates().get(aId)?.user?.name === 'ada', 'b sees a')
  a.destroy()
  await until(() => !b.awareness.getStates().has(aId), 'a gone on b')
  b.destroy()
})

test('three documents over one socket, with no cross-talk', async () => {
  const names = [0, 1, 2].map((i) => uniqueDoc(`hp/multi${i}`))
  const socketA = hocuspocusSocket(server)
  const socketB = hocuspocusSocket(server)
  const as = names.map((name) => hocuspocus(server, name, { websocketProvider: socketA }))
  const bs = names.map((name) => hocuspocus(server, name, { websocketProvider: socketB }))
  await Promise.all([...as, ...bs].map(synced))
  as.forEach((p, i) => p.document.getText('t').insert(0, `doc ${i}`))
  for (const [i, b] of bs.entries()) await until(() => text(b) === `doc ${i}`, `doc ${i} on b`)
  bs[1].setAwarenessField('user', { name: 'only-in-1' })
  const bId = bs[1].document.clientID
  await until(() => as[1].awareness.getStates().get(bId)?.user?.name === 'only-in-1', 'presence in doc 1')
  for (const i of [0, 2]) {
    assert.equal(text(as[i]), `doc ${i}`)
    assert.equal(as[i].awareness.getStates().get(bId)?.user, undefined, `no presence leak into doc ${i}`)
  }
  destroyAll(...as, ...bs)
  socketA.destroy()
  socketB.destroy()
})

test('a WebsocketProvider and a HocuspocusProvider converge both ways and see each other', async () => {
  const doc = uniqueDoc('hp/both')
  const ws = provider(server, doc)
  const hp = hocuspocus(server, doc)
  await Promise.all([synced(ws), synced(hp)])
  ws.doc.getText('t').insert(0, 'from ws')
  await until(() => text(hp) === 'from ws', 'ws -> hocuspocus')
  hp.document.getText('t').insert(7, ', from hp')
  await until(() => ws.doc.getText('t').toString() === 'from ws, from hp', 'hocuspocus -> ws')
  ws.awareness.setLocalStateField('user', { name: 'ws' })
  hp.setAwarenessField('user', { name: 'hp' })
  await until(() => hp.awareness.getStates().get(ws.doc.clientID)?.user?.name === 'ws', 'ws presence on hp')
  await until(() => ws.awareness.getStates().get(hp.document.clientID)?.user?.name === 'hp', 'hp presence on ws')
  const hpId = hp.document.clientID
  hp.destroy()
  await until(() => !ws.awareness.getStates().has(hpId), 'hp presence removed on ws')
  ws.destroy()
})

test('stateless messages reach the other connections of the document', async () => {
  const doc = uniqueDoc('hp/stateless')
  const got = []
  const a = hocuspocus(server, doc)
  const b = hocuspocus(server, doc, { onStateless: ({ payload }) => got.push(payload) })
  const other = []
  const c = hocuspocus(server, uniqueDoc('hp/stateless-other'), { onStateless: ({ payload }) => other.push(payload) })
  await Promise.all([synced(a), synced(b), synced(c)])
  a.sendStateless('{"ping":1}')
  await until(() => got.length === 1, 'stateless on b')
  assert.deepEqual(got, ['{"ping":1}'])
  assert.deepEqual(other, [])
  destroyAll(a, b, c)
})

test('a refused token fails one document while the socket\'s other document syncs', async () => {
  const ok = uniqueDoc('hp-team/ok')
  const denied = uniqueDoc('hp-secret/doc')
  const jwt = token(secret, { sub: 'ada', docs: { 'hp-team/*': 'write' } })
  const socket = hocuspocusSocket(authed)
  const failures = []
  const good = hocuspocus(authed, ok, { websocketProvider: socket, token: jwt })
  const bad = hocuspocus(authed, denied, {
    websocketProvider: socket,
    token: jwt,
    onAuthenticationFailed: ({ reason }) => failures.push(reason)
  })
  await until(() => failures.length === 1, 'onAuthenticationFailed')
  assert.ok(failures[0].length > 0, 'a reason is given')
  await synced(good)
  assert.equal(good.authorizedScope, 'read-write')
  const peer = hocuspocus(authed, ok, { token: jwt })
  await synced(peer)
  good.document.getText('t').insert(0, 'still syncing')
  await until(() => text(peer) === 'still syncing', 'the other document keeps syncing')
  assert.equal(bad.synced, false)
  destroyAll(good, bad, peer)
  socket.destroy()
})

test('a read-only token gets scope readonly, and its edits reach no one', async () => {
  const doc = uniqueDoc('hp-team/ro')
  const heard = []
  const writer = hocuspocus(authed, doc, {
    token: token(secret, { sub: 'w', docs: { 'hp-team/*': 'write' } }),
    onStateless: ({ payload }) => heard.push(payload)
  })
  const reader = hocuspocus(authed, doc, { token: token(secret, { sub: 'r', docs: { 'hp-team/*': 'read' } }) })
  await Promise.all([synced(writer), synced(reader)])
  assert.equal(reader.authorizedScope, 'readonly')
  assert.equal(writer.authorizedScope, 'read-write')
  reader.document.getText('t').insert(0, 'forbidden')
  // Frames of one socket reach the room in order: once the writer hears the
  // reader's stateless message, the reader's edit was refused or broadcast.
  reader.sendStateless('after the edit')
  await until(() => heard.includes('after the edit'), 'the barrier reaches the writer')
  assert.equal(text(writer), '', 'the reader edit reached the writer')
  assert.equal(reader.hasUnsyncedChanges, true, 'a refused edit is never acknowledged')
  writer.document.getText('t').insert(0, 'allowed')
  await until(() => text(reader).includes('allowed'), 'writer reaches reader')
  const late = hocuspocus(authed, doc, { token: token(secret, { sub: 'w2', docs: { 'hp-team/*': 'write' } }) })
  await synced(late)
  assert.equal(text(late), 'allowed')
  destroyAll(writer, reader, late)
})

test('once the provider shows no unsynced changes, a SIGKILL loses nothing', async () => {
  const databaseUrl = freshSqlite()
  const first = await startServer({ databaseUrl })
  const doc = uniqueDoc('hp-durable')
  const p = hocuspocus(first, doc)
  await synced(p)
  const t = p.document.getText('t')
  for (let i = 0; i < 200; i++) t.insert(t.length, `${i % 10}`)
  p.document.getMap('m').set('last', 'edit')
  await until(() => !p.hasUnsyncedChanges, 'every edit acknowledged')
  await first.stop() // SIGKILL, straight after the last acknowledgement
  p.destroy()
  const second = await startServer({ databaseUrl })
  try {
    const stored = await readOverHttp(second, doc)
    assert.equal(stored.getText('t').toString(), t.toString())
    assert.equal(stored.getMap('m').get('last'), 'edit')
  } finally {
    await second.stop()
  }
})
