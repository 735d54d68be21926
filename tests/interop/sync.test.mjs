// The real yjs + y-websocket client against concord.
import { test, after } from 'node:test'
import assert from 'node:assert/strict'
import * as Y from 'yjs'
import { startServer, provider, until, synced, uniqueDoc, destroyAll } from './harness.mjs'

const server = await startServer()
after(() => server.stop())

test('two providers converge on Y.Text and Y.Map edits', async () => {
  const doc = uniqueDoc('team-a/notes')
  const a = provider(server, doc)
  const b = provider(server, doc)
  await Promise.all([synced(a), synced(b)])
  a.doc.getText('t').insert(0, 'hello')
  b.doc.getMap('m').set('k', 42)
  await until(() => b.doc.getText('t').toString() === 'hello', 'text on b')
  await until(() => a.doc.getMap('m').get('k') === 42, 'map on a')
  b.doc.getText('t').insert(5, ' world')
  await until(() => a.doc.getText('t').toString() === 'hello world', 'text on a')
  assert.deepEqual(Y.encodeStateVector(a.doc), Y.encodeStateVector(b.doc))
  destroyAll(a, b)
})

test('a late joiner gets everything', async () => {
  const doc = uniqueDoc('late')
  const a = provider(server, doc)
  await synced(a)
  for (let i = 0; i < 100; i++) a.doc.getText('t').insert(i, 'x')
  a.doc.getMap('m').set('done', true)
  // Wait until the server holds it all (a second client sees it), then join late.
  const b = provider(server, doc)
  await until(() => b.doc.getMap('m').get('done') === true, 'b sees edits')
  const late = provider(server, doc)
  await synced(late)
  await until(() => late.doc.getText('t').toString() === 'x'.repeat(100), 'late joiner text')
  assert.equal(late.doc.getMap('m').get('done'), true)
  destroyAll(a, b, late)
})

test('awareness appears and disappears', async () => {
  const doc = uniqueDoc('presence')
  const a = provider(server, doc)
  const b = provider(server, doc)
  await Promise.all([synced(a), synced(b)])
  a.awareness.setLocalStateField('user', { name: 'ada' })
  const aId = a.doc.clientID
  await until(() => b.awareness.getStates().get(aId)?.user?.name === 'ada', 'b sees a')
  a.destroy()
  await until(() => !b.awareness.getStates().has(aId), 'a gone on b')
  b.destroy()
})

test('a client that went offline and edited merges on reconnect', async () => {
  const doc = uniqueDoc('offline')
  const a = provider(server, doc)
  const b = provider(server, doc)
  await Promise.all([synced(a), synced(b)])
  a.doc.getText('t').insert(0, 'base')
  await until(() => b.doc.getText('t').toString() === 'base', 'base on b')
  a.disconnect()
  await until(() => !a.wsconnected, 'a offline')
  a.doc.getText('t').insert(4, ' offline')
  b.doc.getText('t').insert(0, 'online ')
  a.connect()
  const want = 'online base offline'
  await until(() => a.doc.getText('t').toString() === want, 'merge on a')
  await until(() => b.doc.getText('t').toString() === want, 'merge on b')
  destroyAll(a, b)
})

test('an idle client alone in a document stays connected past 30 s', async () => {
  const doc = uniqueDoc('idle')
  const a = provider(server, doc)
  await synced(a)
  a.awareness.setLocalStateField('user', { name: 'solo' })
  let drops = 0
  a.on('status', ({ status }) => { if (status === 'disconnected') drops++ })
  // y-websocket drops a socket that received nothing for 30 s; awareness
  // renewals (every 15 s) echoed by the server keep it alive.
  await new Promise((resolve) => setTimeout(resolve, 36000))
  assert.equal(drops, 0, 'the provider dropped its socket')
  assert.equal(a.wsconnected, true)
  a.destroy()
})
