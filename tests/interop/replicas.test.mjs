// The real JavaScript client on each of two replicas sharing PostgreSQL and Redis.
import { test, after } from 'node:test'
import assert from 'node:assert/strict'
import { startServer, provider, hocuspocus, until, synced, uniqueDoc, destroyAll, freshPostgres } from './harness.mjs'

const redis = process.env.REDIS_URL_SHARED ?? 'redis://127.0.0.1:6379'
const databaseUrl = freshPostgres()
const args = ['--auto-migrate', 'true', '--redis-url', redis]
const r1 = await startServer({ databaseUrl, args: [...args, '--replica-id', 'js1'] })
const r2 = await startServer({ databaseUrl, args: [...args, '--replica-id', 'js2'] })
after(() => Promise.all([r1.stop(), r2.stop()]))

test('providers on two replicas converge and see each other', async () => {
  const doc = uniqueDoc('js/replicas')
  const a = provider(r1, doc)
  const b = provider(r2, doc)
  await Promise.all([synced(a), synced(b)])
  a.doc.getText('t').insert(0, 'one ')
  b.doc.getMap('m').set('from', 'r2')
  await until(() => b.doc.getText('t').toString() === 'one ', 'text crosses r1 -> r2')
  await until(() => a.doc.getMap('m').get('from') === 'r2', 'map crosses r2 -> r1')
  a.awareness.setLocalStateField('user', { name: 'ada' })
  await until(() => b.awareness.getStates().get(a.doc.clientID)?.user?.name === 'ada', 'awareness crosses')
  const late = provider(r2, doc)
  await synced(late)
  await until(() => late.doc.getText('t').toString() === 'one ', 'late joiner on r2')
  const aId = a.doc.clientID
  a.destroy()
  await until(() => !b.awareness.getStates().has(aId), 'awareness removed across replicas')
  assert.equal(late.doc.getMap('m').get('from'), 'r2')
  destroyAll(b, late)
})

test('a WebsocketProvider on one replica and a HocuspocusProvider on the other converge and see each other', async () => {
  const doc = uniqueDoc('js/replicas-hp')
  const ws = provider(r1, doc)
  const hp = hocuspocus(r2, doc)
  await Promise.all([synced(ws), synced(hp)])
  ws.doc.getText('t').insert(0, 'ws on r1')
  await until(() => hp.document.getText('t').toString() === 'ws on r1', 'r1 ws -> r2 hocuspocus')
  hp.document.getMap('m').set('from', 'hp on r2')
  await until(() => ws.doc.getMap('m').get('from') === 'hp on r2', 'r2 hocuspocus -> r1 ws')
  ws.awareness.setLocalStateField('user', { name: 'ws' })
  hp.setAwarenessField('user', { name: 'hp' })
  await until(() => hp.awareness.getStates().get(ws.doc.clientID)?.user?.name === 'ws', 'ws presence on r2')
  await until(() => ws.awareness.getStates().get(hp.document.clientID)?.user?.name === 'hp', 'hp presence on r1')
  const hpId = hp.document.clientID
  hp.destroy()
  await until(() => !ws.awareness.getStates().has(hpId), 'hp presence removed across replicas')
  ws.destroy()
})

test('stateless messages cross replicas', async () => {
  const doc = uniqueDoc('js/replicas-stateless')
  const heard = []
  const a = hocuspocus(r1, doc)
  const b = hocuspocus(r2, doc, { onStateless: ({ payload }) => heard.push(payload) })
  await Promise.all([synced(a), synced(b)])
  a.sendStateless('across')
  await until(() => heard.length > 0, 'stateless on r2')
  assert.deepEqual(heard, ['across'])
  destroyAll(a, b)
})
