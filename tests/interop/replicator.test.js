// thali's own replicator (POST /_replicate on the node) against the real pouchdb-server (npm)
// as the remote peer, in both directions: documents, conflicts, deletions, attachments,
// checkpoints that the next run resumes from, and continuous pull.
'use strict';
const test = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const PouchDB = require('pouchdb');
const { ThaliNode, PouchServer, waitFor } = require('./harness');

let node;
let server;

async function replicate(body) {
  const r = await fetch(`http://127.0.0.1:${node.port}/_replicate`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', Authorization: node.auth() },
    body: JSON.stringify(body),
  });
  const json = await r.json();
  return { status: r.status, json };
}
// Every document's leaves (bodies with _revisions) and its winner with _conflicts.
async function snapshot(db) {
  const changes = await db.changes({ style: 'all_docs' });
  const out = {};
  for (const row of changes.results) {
    const leaves = (await db.get(row.id, { open_revs: 'all', revs: true }))
      .map((r) => r.ok)
      .sort((a, b) => (a._rev < b._rev ? -1 : 1));
    let winner;
    try {
      const w = await db.get(row.id, { conflicts: true });
      winner = { rev: w._rev, conflicts: (w._conflicts || []).sort() };
    } catch (e) {
      winner = { deleted: true };
    }
    out[row.id] = { leaves, winner };
  }
  return out;
}
// A database with plain documents, a conflict (two branches), a deletion and a binary attachment.
async function fill(db, prefix) {
  await db.bulkDocs(Array.from({ length: 200 }, (_, i) => ({ _id: `${prefix}-${String(i).padStart(4, '0')}`, i })));
  await db.bulkDocs([
    { _id: 'conflicted', v: 'a', _rev: '1-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa' },
    { _id: 'conflicted', v: 'b', _rev: '1-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb' },
  ], { new_edits: false });
  const d = await db.get(`${prefix}-0007`);
  await db.remove(d);
  const bytes = crypto.randomBytes(200 * 1024);
  await db.put({ _id: 'with-att', _attachments: { 'blob.bin': { content_type: 'application/octet-stream', data: bytes.toString('base64') } } });
  return bytes;
}

test.before(async () => {
  node = await ThaliNode.start('replicator');
  node.auth = () => `Basic ${Buffer.from(`admin:${require('./harness').PASSWORD}`).toString('base64')}`;
  server = await PouchServer.start('replicator');
});
test.after(async () => {
  await node.destroy();
  await server.destroy();
});

test('thali pulls from pouchdb-server', async () => {
  const src = new PouchDB(server.url('pullsrc'));
  const bytes = await fill(src, 'p');
  const res = await replicate({ source: server.url('pullsrc'), target: 'pulled', create_target: true });
  assert.equal(res.status, 200, JSON.stringify(res.json));
  assert.equal(res.json.history[0].doc_write_failures, 0);
  assert.equal(res.json.history[0].docs_written, 203);
  const mine = new PouchDB(node.url('pulled'));
  assert.deepEqual(await snapshot(mine), await snapshot(src));
  const att = await mine.getAttachment('with-att', 'blob.bin');
  assert.ok(Buffer.compare(att, bytes) === 0);
  // The checkpoint is found again: the next run reads only what is new.
  await src.put({ _id: 'later' });
  const again = await replicate({ source: server.url('pullsrc'), target: 'pulled' });
  assert.equal(again.json.history[0].docs_read, 1, JSON.stringify(again.json));
});

test('thali pushes to pouchdb-server', async () => {
  const mine = new PouchDB(node.url('pushsrc'));
  const bytes = await fill(mine, 'q');
  const res = await replicate({ source: 'pushsrc', target: server.url('pushed'), create_target: true });
  assert.equal(res.status, 200, JSON.stringify(res.json));
  assert.equal(res.json.history[0].docs_written, 203);
  const theirs = new PouchDB(server.url('pushed'));
  assert.deepEqual(await snapshot(theirs), await snapshot(mine));
  const att = await theirs.getAttachment('with-att', 'blob.bin');
  assert.ok(Buffer.compare(att, bytes) === 0);
  const again = await replicate({ source: 'pushsrc', target: server.url('pushed') });
  assert.equal(again.json.no_changes, true, JSON.stringify(again.json));
});

test('continuous pull from pouchdb-server', async () => {
  const src = new PouchDB(server.url('live'));
  await src.put({ _id: 'first' });
  const start = await replicate({ source: server.url('live'), target: 'live', create_target: true, continuous: true });
  assert.equal(start.status, 202, JSON.stringify(start.json));
  const mine = new PouchDB(node.url('live'));
  await waitFor('first doc', async () => (await mine.get('first'))._id === 'first');
  await src.bulkDocs(Array.from({ length: 30 }, (_, i) => ({ _id: `live-${i}` })));
  await waitFor('30 more', async () => (await mine.info()).doc_count === 31);
  const cancel = await replicate({ source: server.url('live'), target: 'live', create_target: true, continuous: true, cancel: true });
  assert.equal(cancel.status, 200);
});
