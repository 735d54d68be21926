// History with the real clients: versions with their authors, reads of a
// version, restores that every connected client sees (on two replicas with
// PostgreSQL), edits after a restore, undoing one, and the JSON read against
// y-prosemirror's own. Run on SQLite (one server) and on PostgreSQL + Redis
// (two replicas).
import { test, after } from 'node:test'
import assert from 'node:assert/strict'
import { isDeepStrictEqual as same } from 'node:util'
import * as Y from 'yjs'
import { Schema } from 'prosemirror-model'
import { prosemirrorJSONToYXmlFragment, yXmlFragmentToProsemirrorJSON } from 'y-prosemirror'
import { startServer, provider, until, synced, uniqueDoc, destroyAll, freshPostgres, token } from './harness.mjs'

const secret = 'history-interop-secret'
const redis = process.env.REDIS_URL_SHARED ?? 'redis://127.0.0.1:6379'
const env = { CONCORD_JWT_SECRET: secret }
// Long enough that a test's own steps never wait on it, short enough to see.
const idle = ['--version-idle', '2s']

const ada = token(secret, { sub: 'ada', docs: { '*': 'write' } })
const bob = token(secret, { sub: 'bob', docs: { '*': 'write' } })

// What Tiptap's StarterKit writes, in miniature: headings with a numeric
// attribute, paragraphs, bold and links.
const schema = new Schema({
  nodes: {
    doc: { content: 'block+' },
    paragraph: { group: 'block', content: 'inline*' },
    heading: { group: 'block', attrs: { level: { default: 1 } }, content: 'inline*' },
    text: { group: 'inline' }
  },
  marks: { bold: {}, link: { attrs: { href: {} } } }
})

const sqlite = await startServer({ env, args: idle })
const db = freshPostgres()
const pgArgs = ['--auto-migrate', 'true', '--redis-url', redis, ...idle]
const r1 = await startServer({ env, databaseUrl: db, args: [...pgArgs, '--replica-id', 'h1'] })
const r2 = await startServer({ env, databaseUrl: db, args: [...pgArgs, '--replica-id', 'h2'] })
after(() => Promise.all([sqlite.stop(), r1.stop(), r2.stop()]))

const setups = { sqlite: [sqlite, sqlite], postgres: [r1, r2] }

const as = (who) => ({ params: { token: who } })
const auth = (who) => ({ authorization: `Bearer ${who}` })

async function api (server, method, path, who, body) {
  const headers = { ...auth(who) }
  if (body !== undefined) headers['content-type'] = 'application/json'
  const res = await fetch(`${server.http}${path}`, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) })
  const text = await res.text()
  return { status: res.status, json: text ? JSON.parse(text) : null }
}

const docPath = (doc) => `/api/docs/${encodeURIComponent(doc)}`

/**
 * Everything a client shows, as JSON: what the server's JSON read must equal.
 * Through JSON text, as the server's arrives: ProseMirror builds some of its
 * objects without a prototype, which a deep comparison would tell apart.
 */
function content (ydoc) {
  return JSON.parse(JSON.stringify({
    default: yXmlFragmentToProsemirrorJSON(ydoc.getXmlFragment('default')),
    code: ydoc.getText('code').toString(),
    meta: ydoc.getMap('meta').toJSON(),
    tags: ydoc.getArray('tags').toJSON()
  }))
}

function writeTiptapDoc (ydoc) {
  ydoc.transact(() => {
    prosemirrorJSONToYXmlFragment(schema, {
      type: 'doc',
      content: [
        { type: 'heading', attrs: { level: 2 }, content: [{ type: 'text', text: 'Plan' }] },
        {
          type: 'paragraph',
          content: [
            { type: 'text', text: 'Ship ', marks: [{ type: 'bold' }] },
            { type: 'text', text: 'history', marks: [{ type: 'link', attrs: { href: 'https://concord.dev' } }] }
          ]
        }
      ]
    }, ydoc.getXmlFragment('default'))
    ydoc.getText('code').insert(0, 'fn main() {}')
    ydoc.getMap('meta').set('title', 'Plan')
    ydoc.getMap('meta').set('pages', 1)
    ydoc.getArray('tags').push(['draft'])
  })
}

/** Edits of every kind: text, formatting, structure, map, array. */
function editEverything (ydoc) {
  ydoc.transact(() => {
    const fragment = ydoc.getXmlFragment('default')
    const heading = fragment.get(0)
    heading.setAttribute('level', 3)
    heading.get(0).insert(4, ' B')
    const p = new Y.XmlElement('paragraph')
    p.insert(0, [new Y.XmlText('added')])
    fragment.insert(2, [p])
    fragment.get(1).get(0).format(0, 4, { bold: null })
    ydoc.getText('code').delete(0, 3)
    ydoc.getMap('meta').set('title', 'Plan B')
    ydoc.getMap('meta').delete('pages')
    ydoc.getArray('tags').push(['final'])
  })
}

/** Asks `ask()` until its answer satisfies `pred` (the server has no push for these). */
async function poll (ask, pred, what, ms = 15000) {
  const started = Date.now()
  for (;;) {
    const answer = await ask()
    if (pred(answer)) return answer
    if (Date.now() - started > ms) assert.fail(`timed out waiting for ${what}; last answer ${JSON.stringify(answer)}`)
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
}

const versionsOf = (server, doc) => poll(
  async () => (await api(server, 'GET', `${docPath(doc)}/versions`, ada)).json?.versions,
  (list) => list?.length > 0, 'a version')

const jsonOf = async (server, doc) =>
  (await fetch(`${server.http}${docPath(doc)}?format=json`, { headers: auth(ada) })).json()

/** Waits until the server holds what `ydoc` shows. */
const serverHas = (server, doc, ydoc) => {
  const expected = content(ydoc)
  return poll(() => jsonOf(server, doc), (json) => same(json, expected), 'the server to hold the edits')
}

for (const [backend, [s1, s2]] of Object.entries(setups)) {
  test(`${backend}: versions after a quiet spell and on request, each with its authors`, async () => {
    const doc = uniqueDoc('js/history-authors')
    const a = provider(s1, doc, new Y.Doc(), as(ada))
    const b = provider(s2, doc, new Y.Doc(), as(bob))
    await Promise.all([synced(a), synced(b)])
    a.doc.getText('t').insert(0, 'hello')
    const [auto] = await versionsOf(s1, doc)
    assert.equal(auto.name, null)
    assert.deepEqual(auto.authors, ['ada'])
    assert.match(auto.at, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/)

    b.doc.getText('t').insert(5, ' world')
    await until(() => a.doc.getText('t').toString() === 'hello world', 'bob\'s edit reaches ada (stored)')
    const named = await api(s1, 'POST', `${docPath(doc)}/versions`, bob, { name: 'draft' })
    assert.equal(named.status, 201)
    assert.equal(named.json.name, 'draft')
    assert.deepEqual(named.json.authors, ['bob'])

    const listed = (await api(s2, 'GET', `${docPath(doc)}/versions`, ada)).json.versions
    assert.deepEqual(listed.map((v) => v.id), [named.json.id, auto.id], 'newest first, each once')
    destroyAll(a, b)
  })

  test(`${backend}: a version reads as the document was, in binary and as JSON`, async () => {
    const doc = uniqueDoc('js/history-read')
    const a = provider(s1, doc, new Y.Doc(), as(ada))
    await synced(a)
    writeTiptapDoc(a.doc)
    await serverHas(s1, doc, a.doc)
    const v1 = await api(s1, 'POST', `${docPath(doc)}/versions`, ada, {})
    assert.equal(v1.status, 201)
    const then = content(a.doc)
    editEverything(a.doc)

    const res = await fetch(`${s2.http}${docPath(doc)}?version=${v1.json.id}`, { headers: auth(ada) })
    assert.equal(res.status, 200)
    assert.equal(res.headers.get('content-type'), 'application/octet-stream')
    const old = new Y.Doc()
    Y.applyUpdate(old, new Uint8Array(await res.arrayBuffer()))
    assert.deepEqual(content(old), then)

    const json = await fetch(`${s2.http}${docPath(doc)}?version=${v1.json.id}&format=json`, { headers: auth(ada) })
    assert.equal(json.headers.get('content-type'), 'application/json')
    assert.deepEqual(await json.json(), then)
    destroyAll(a)
  })

  test(`${backend}: the JSON read equals yXmlFragmentToProsemirrorJSON of a Tiptap-shaped document`, async () => {
    const doc = uniqueDoc('js/history-json')
    const a = provider(s1, doc, new Y.Doc(), as(ada))
    await synced(a)
    writeTiptapDoc(a.doc)
    editEverything(a.doc)
    // On the other replica too, which built the document from the store.
    await serverHas(s2, doc, a.doc)
    assert.deepEqual(await jsonOf(s2, doc), content(a.doc))
    destroyAll(a)
  })

  test(`${backend}: a restore reaches every client, later and offline edits survive it, and it can be undone`, async () => {
    const doc = uniqueDoc('js/history-restore')
    const a = provider(s1, doc, new Y.Doc(), as(ada))
    const b = provider(s2, doc, new Y.Doc(), as(bob))
    const offline = provider(s2, doc, new Y.Doc(), as(bob))
    await Promise.all([synced(a), synced(b), synced(offline)])
    writeTiptapDoc(a.doc)
    await serverHas(s1, doc, a.doc)
    const v1 = (await api(s1, 'POST', `${docPath(doc)}/versions`, ada, { name: 'v1' })).json
    const atV1 = content(a.doc)
    // Several edits back.
    editEverything(a.doc)
    b.doc.getText('code').insert(0, '// bob\n')
    a.doc.getMap('meta').set('owner', 'ada')
    await until(() => same(content(a.doc), content(b.doc)) &&
      same(content(offline.doc), content(b.doc)), 'all three converge')
    const beforeRestore = content(a.doc)

    // This client goes offline and keeps typing.
    offline.disconnect()
    offline.doc.getText('code').insert(0, 'OFF ')
    offline.doc.getXmlFragment('default').get(1).get(0).insert(0, 'offline ')

    const restored = await api(s2, 'POST', `${docPath(doc)}/restore`, ada, { version: v1.id })
    assert.equal(restored.status, 200, JSON.stringify(restored.json))
    assert.ok(restored.json.authors.includes('ada'))
    for (const [name, client] of [['a on the first server', a], ['b on the second', b]]) {
      await until(() => same(content(client.doc), atV1), `${name} to show v1`)
    }

    // Typed after the answer, and offline edits synced later: both survive.
    a.doc.getText('code').insert(a.doc.getText('code').length, ' // after')
    offline.connect()
    await synced(offline)
    const survived = (c) => c.doc.getText('code').toString().includes('OFF ') &&
      c.doc.getText('code').toString().includes(' // after') &&
      JSON.stringify(yXmlFragmentToProsemirrorJSON(c.doc.getXmlFragment('default'))).includes('offline ')
    for (const [name, client] of [['a', a], ['b', b], ['offline', offline]]) {
      await until(() => survived(client), `${name} to keep the later and offline edits`)
    }

    // Undo: restore the version recorded just before the restore.
    const versions = (await api(s1, 'GET', `${docPath(doc)}/versions`, ada)).json.versions
    const index = versions.findIndex((v) => v.id === restored.json.id)
    const before = versions[index + 1]
    assert.ok(before && before.id !== v1.id, 'a version was recorded before the restore')
    const undone = await api(s1, 'POST', `${docPath(doc)}/restore`, bob, { version: before.id })
    assert.equal(undone.status, 200)
    for (const client of [a, b, offline]) {
      await until(() => same(content(client.doc), beforeRestore), 'the restore undone')
    }
    destroyAll(a, b, offline)
  })
}

test('history routes answer 404 for unknown versions, 400 for bad bodies, 401 and 403 without the right token', async () => {
  const doc = uniqueDoc('js/history-errors')
  const other = uniqueDoc('js/history-errors-other')
  const reader = token(secret, { sub: 'rita', docs: { '*': 'read' } })
  const a = provider(sqlite, doc, new Y.Doc(), as(ada))
  const o = provider(sqlite, other, new Y.Doc(), as(ada))
  await Promise.all([synced(a), synced(o)])
  a.doc.getText('t').insert(0, 'x')
  o.doc.getText('t').insert(0, 'y')
  const created = await poll(() => api(sqlite, 'POST', `${docPath(other)}/versions`, ada), (r) => r.status === 201, 'a version of the other document')
  const foreign = created.json.id
  const path = docPath(doc)
  assert.equal((await api(sqlite, 'POST', `${path}/restore`, ada, { version: foreign })).status, 404, 'another document\'s version')
  assert.equal((await api(sqlite, 'POST', `${path}/restore`, ada, { version: 'nope' })).status, 404)
  assert.equal((await fetch(`${sqlite.http}${path}?version=nope`, { headers: auth(ada) })).status, 404)
  assert.equal((await fetch(`${sqlite.http}${path}?version=${foreign}`, { headers: auth(ada) })).status, 404)
  const bad = await fetch(`${sqlite.http}${path}/restore`, { method: 'POST', headers: auth(ada), body: '{"version":' })
  assert.equal(bad.status, 400)
  assert.match((await bad.json()).error, /JSON/)
  assert.equal((await api(sqlite, 'POST', `${path}/versions`, ada, { name: 7 })).status, 400)
  assert.equal((await api(sqlite, 'GET', `${docPath(uniqueDoc('js/never'))}/versions`, ada)).status, 404)
  for (const [method, route, body] of [['GET', '/versions'], ['POST', '/versions', {}], ['POST', '/restore', { version: foreign }]]) {
    const res = await fetch(`${sqlite.http}${path}${route}`, { method, body: body && JSON.stringify(body) })
    assert.equal(res.status, 401, `${method} ${route} without a token`)
  }
  for (const query of ['?format=json', `?version=${foreign}`]) {
    assert.equal((await fetch(`${sqlite.http}${path}${query}`)).status, 401, `GET ${query} without a token`)
  }
  assert.equal((await api(sqlite, 'GET', `${path}/versions`, reader)).status, 200)
  assert.equal((await api(sqlite, 'POST', `${path}/versions`, reader, {})).status, 403)
  assert.equal((await api(sqlite, 'POST', `${path}/restore`, reader, { version: foreign })).status, 403)
  assert.equal(a.doc.getText('t').toString(), 'x', 'nothing changed')
  destroyAll(a, o)
})
