// PouchDB 9 replicating with a thali node whose design documents are JavaScript, as a CouchDB
// app's are: a validator refuses some pushed documents (reported per document, the replication
// going on, as against CouchDB), and a filter selects what a pull brings.
'use strict';
const test = require('node:test');
const assert = require('node:assert/strict');
const path = require('node:path');
const fs = require('node:fs');
const PouchDB = require('pouchdb');
const { ThaliNode, tempDir } = require('./harness');

let node;
let dir;

test.before(async () => {
  node = await ThaliNode.start('js-replication');
  dir = tempDir('js-replication-pouch');
});
test.after(async () => {
  await node.destroy();
  fs.rmSync(dir, { recursive: true, force: true });
});

const APP = {
  _id: '_design/app',
  validate_doc_update: 'function (newDoc) { if (newDoc.bad) throw ({ forbidden: "bad documents are refused" }); }',
  filters: { even: 'function (doc, req) { return doc.n % 2 === Number(req.query.rest || 0); }' },
};

test('a JavaScript validator refuses pushed documents one by one', async () => {
  const remote = new PouchDB(node.url('jsrep'));
  await remote.info();
  await remote.put(APP);
  const local = new PouchDB(path.join(dir, 'push'));
  await local.bulkDocs(Array.from({ length: 20 }, (_, n) => ({ _id: `d${n}`, n, bad: n % 5 === 0 })));
  const res = await local.replicate.to(remote);
  assert.equal(res.ok, true);
  assert.equal(res.docs_read, 20);
  assert.equal(res.docs_written, 16);
  assert.equal(res.doc_write_failures, 4);
  const ids = (await remote.allDocs()).rows.map((r) => r.id).filter((id) => !id.startsWith('_design/'));
  assert.equal(ids.length, 16);
  assert.ok(!ids.includes('d5'));
  // A direct write gets CouchDB's answer.
  await assert.rejects(remote.put({ _id: 'x', bad: true }), (e) => e.status === 403 && e.name === 'forbidden' && e.message === 'bad documents are refused');
  await local.close();
});

test('a JavaScript filter selects what PouchDB pulls', async () => {
  const remote = new PouchDB(node.url('jsrep'));
  const local = new PouchDB(path.join(dir, 'pull'));
  const res = await local.replicate.from(remote, { filter: 'app/even', query_params: { rest: 1 } });
  assert.equal(res.ok, true);
  const ids = (await local.allDocs()).rows.map((r) => r.id).sort();
  // Odd n, not refused earlier (multiples of 5 never arrived): 1 3 7 9 11 13 17 19.
  assert.deepEqual(ids, ['d1', 'd11', 'd13', 'd17', 'd19', 'd3', 'd7', 'd9']);
  await local.close();
});
