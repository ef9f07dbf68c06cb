// Real PouchDB 9 (npm) replicating with a real thali node.
'use strict';
const test = require('node:test');
const assert = require('node:assert/strict');
const path = require('node:path');
const crypto = require('node:crypto');
const PouchDB = require('pouchdb');
const { ThaliNode, tempDir, waitFor } = require('./harness');

let node;
let dir;
let n = 0;

function local(name) {
  return new PouchDB(path.join(dir, `${name}-${n++}`));
}
function remote(name) {
  return new PouchDB(node.url(name));
}
async function replicate(src, dst, opts = {}) {
  const res = await PouchDB.replicate(src, dst, opts);
  assert.equal(res.ok, true, JSON.stringify(res));
  return res;
}
// Every leaf with its full body, for comparing revision trees across databases.
async function leaves(db, id) {
  const revs = await db.get(id, { open_revs: 'all', revs: true });
  return revs
    .map((r) => r.ok)
    .sort((a, b) => (a._rev < b._rev ? -1 : 1));
}

test.before(async () => {
  dir = tempDir('pouch');
  node = await ThaliNode.start('pouch');
});
test.after(async () => {
  await node.destroy();
});

test('push and pull one-shot', async () => {
  const a = local('a');
  const r = remote('oneshot');
  const docs = Array.from({ length: 250 }, (_, i) => ({ _id: `doc-${String(i).padStart(4, '0')}`, i }));
  await a.bulkDocs(docs);
  const push = await replicate(a, r);
  assert.equal(push.docs_written, 250);
  const info = await r.info();
  assert.equal(info.doc_count, 250);
  // Edit remotely, pull into a fresh local db.
  const d = await r.get('doc-0007');
  await r.put({ ...d, edited: true });
  const b = local('b');
  const pull = await replicate(r, b);
  assert.equal(pull.docs_written, 250);
  assert.equal((await b.get('doc-0007')).edited, true);
  const all = await b.allDocs();
  assert.equal(all.rows.length, 250);
  // Revision histories match.
  const rb = await b.get('doc-0007', { revs: true });
  const rr = await r.get('doc-0007', { revs: true });
  assert.deepEqual(rb._revisions, rr._revisions);
});

test('conflicts converge on the same winner and _conflicts on both sides', async () => {
  const a = local('ca');
  const r = remote('conflicts');
  await a.put({ _id: 'x', v: 0 });
  await replicate(a, r);
  const la = await a.get('x');
  const lr = await r.get('x');
  await a.put({ ...la, v: 'local' });
  await r.put({ ...lr, v: 'remote' });
  await a.put({ _id: 'gone', v: 1 });
  await replicate(a, r);
  await replicate(r, a);
  const xa = await a.get('x', { conflicts: true });
  const xr = await r.get('x', { conflicts: true });
  assert.equal(xa._rev, xr._rev);
  assert.equal(xa.v, xr.v);
  assert.deepEqual(xa._conflicts, xr._conflicts);
  assert.equal(xa._conflicts.length, 1);
  assert.deepEqual(await leaves(a, 'x'), await leaves(r, 'x'));
  // Resolve on the remote by deleting the loser; the resolution replicates.
  await r.remove('x', xr._conflicts[0]);
  // Deletions replicate too.
  const gone = await r.get('gone');
  await r.remove(gone);
  await replicate(r, a);
  const after = await a.get('x', { conflicts: true });
  assert.equal(after._conflicts, undefined);
  await assert.rejects(a.get('gone'), (e) => e.status === 404 && e.reason === 'deleted');
  assert.deepEqual(await leaves(a, 'x'), await leaves(r, 'x'));
});

test('binary attachments of several MB both ways', async () => {
  const a = local('att');
  const r = remote('attachments');
  const big = crypto.randomBytes(3 * 1024 * 1024 + 17);
  const small = Buffer.from('hello thali');
  await a.put({ _id: 'bin', _attachments: { 'big.bin': { content_type: 'application/octet-stream', data: big } } });
  await replicate(a, r);
  const got = await r.getAttachment('bin', 'big.bin');
  assert.ok(Buffer.compare(got, big) === 0, 'big attachment differs after push');
  // Add one on the remote, pull into a new db.
  const doc = await r.get('bin');
  await r.putAttachment('bin', 'small.txt', doc._rev, small, 'text/plain');
  const b = local('att2');
  await replicate(r, b);
  const d = await b.get('bin', { attachments: true, binary: true });
  assert.ok(Buffer.compare(d._attachments['big.bin'].data, big) === 0, 'big attachment differs after pull');
  assert.equal(d._attachments['small.txt'].data.toString(), 'hello thali');
  assert.equal(d._attachments['small.txt'].content_type, 'text/plain');
  const md5 = 'md5-' + crypto.createHash('md5').update(big).digest('base64');
  assert.equal(d._attachments['big.bin'].digest, md5);
});

test('live sync both ways', async () => {
  const a = local('live');
  const r = remote('live');
  await r.info(); // creates it
  const sync = a.sync(r, { live: true, retry: true });
  try {
    await a.put({ _id: 'from-local', v: 1 });
    await waitFor('local doc on remote', async () => (await r.get('from-local')).v === 1);
    await r.put({ _id: 'from-remote', v: 2 });
    await waitFor('remote doc locally', async () => (await a.get('from-remote')).v === 2);
    const d = await a.get('from-remote');
    await a.remove(d);
    await waitFor('deletion on remote', async () => {
      try {
        await r.get('from-remote');
        return false;
      } catch (e) {
        return e.status === 404;
      }
    });
  } finally {
    sync.cancel();
  }
});

test('checkpoints in _local survive a node restart', async () => {
  const a = local('cp');
  const r = remote('checkpoints');
  await a.bulkDocs(Array.from({ length: 120 }, (_, i) => ({ _id: `c${i}` })));
  const first = await replicate(a, r);
  assert.equal(first.docs_written, 120);
  const pull1 = await replicate(r, local('cp-pull'));
  assert.equal(pull1.docs_read, 120);
  await node.restart();
  // Pushing again reads nothing: the checkpoint on the node was kept.
  const second = await replicate(a, r);
  assert.equal(second.docs_read, 0);
  assert.equal(second.docs_written, 0);
  // A few more docs: only those travel.
  await a.bulkDocs([{ _id: 'n1' }, { _id: 'n2' }]);
  const third = await replicate(a, r);
  assert.equal(third.docs_written, 2);
  const info = await r.info();
  assert.equal(info.doc_count, 122);
  // The checkpoint documents are plain _local docs on the node.
  const res = await fetch(`${node.base}/checkpoints/_local_docs`.replace(/\/\/admin:[^@]+@/, '//'), {
    headers: { Authorization: 'Basic ' + Buffer.from(`admin:${require('./harness').PASSWORD}`).toString('base64') },
  });
  const body = await res.json();
  assert.ok(body.rows.length >= 1, JSON.stringify(body));
});
