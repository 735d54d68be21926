// A restore as CodeMirror 6 editors bound by y-codemirror.next see it: real
// EditorViews (in jsdom) on two replicas sharing PostgreSQL and Redis.
// In a file of its own: the DOM globals it needs must not leak into the
// other suites' processes.
import { test, after } from 'node:test'
import assert from 'node:assert/strict'
import { JSDOM } from 'jsdom'
import { startServer, provider, until, synced, uniqueDoc, destroyAll, freshPostgres } from './harness.mjs'

const dom = new JSDOM('<!doctype html><html><body></body></html>', { pretendToBeVisual: true })
for (const key of ['window', 'document', 'navigator', 'MutationObserver', 'requestAnimationFrame', 'getComputedStyle', 'Node', 'HTMLElement', 'Window']) {
  if (!(key in globalThis)) globalThis[key] = dom.window[key]
}
const Y = await import('yjs')
const { EditorState } = await import('@codemirror/state')
const { EditorView } = await import('@codemirror/view')
const { yCollab } = await import('y-codemirror.next')

const redis = process.env.REDIS_URL_SHARED ?? 'redis://127.0.0.1:6379'
const db = freshPostgres()
const args = ['--auto-migrate', 'true', '--redis-url', redis]
const r1 = await startServer({ databaseUrl: db, args: [...args, '--replica-id', 'cm1'] })
const r2 = await startServer({ databaseUrl: db, args: [...args, '--replica-id', 'cm2'] })
after(() => { dom.window.close(); return Promise.all([r1.stop(), r2.stop()]) })

/** A CodeMirror editor on the document's `codemirror` text, through a provider. */
function editor (server, doc) {
  const p = provider(server, doc, new Y.Doc())
  const view = new EditorView({
    state: EditorState.create({ doc: '', extensions: [yCollab(p.doc.getText('codemirror'), p.awareness)] }),
    parent: document.body
  })
  return { p, view, text: () => view.state.doc.toString() }
}

const type = (e, at, insert) => e.view.dispatch({ changes: { from: at, insert } })

test('CodeMirror editors on two replicas show a restored version and keep typing after it', async () => {
  const doc = uniqueDoc('js/codemirror')
  const a = editor(r1, doc)
  const b = editor(r2, doc)
  await Promise.all([synced(a.p), synced(b.p)])
  type(a, 0, 'fn main() {\n  println!("v1");\n}\n')
  const v1Text = a.text()
  await until(() => b.text() === v1Text, 'b to show a\'s typing')
  const path = `${r1.http}/api/docs/${encodeURIComponent(doc)}`
  const v1 = await (await fetch(`${path}/versions`, { method: 'POST', body: '{"name":"v1"}' })).json()

  type(b, v1Text.indexOf('v1'), 'not ')
  a.view.dispatch({ changes: { from: 0, to: 2, insert: 'pub fn' } })
  await until(() => a.text() === b.text() && a.text() !== v1Text, 'both to show the later edits')

  const res = await fetch(`${r2.http}/api/docs/${encodeURIComponent(doc)}/restore`, { method: 'POST', body: JSON.stringify({ version: v1.id }) })
  assert.equal(res.status, 200)
  await until(() => a.text() === v1Text && b.text() === v1Text, 'both editors to show v1')

  type(b, b.text().length, '// after\n')
  await until(() => a.text() === `${v1Text}// after\n`, 'typing after the restore to reach a')
  for (const e of [a, b]) e.view.destroy()
  destroyAll(a.p, b.p)
})
