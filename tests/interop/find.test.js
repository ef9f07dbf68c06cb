// Mango through pouchdb-find 9: the same indexes and queries on a local PouchDB (pouchdb-find's
// own in-browser planner over LevelDB) and on thali over HTTP (pouchdb-find sends `_index` and
// `_find`). Both must return the same documents in the same order. An index created on thali
// replicates to PouchDB as the `language: "query"` design document it is, and PouchDB uses it.
'use strict';
const test = require('node:test');
const assert = require('node:assert/strict');
const path = require('node:path');
const fs = require('node:fs');
const PouchDB = require('pouchdb');
PouchDB.plugin(require('pouchdb-find'));
const { ThaliNode, tempDir } = require('./harness');

let node;
let dir;
let local;
let remote;

const COLORS = ['red', 'green', 'blue', 'black'];
const DOCS = Array.from({ length: 300 }, (_, i) => {
  const d = {
    _id: `doc${String(i).padStart(4, '0')}`,
    color: COLORS[i % 4],
    size: (i * 37) % 101,
    name: `item ${i % 17}`,
    tags: Array.from({ length: i % 3 }, (_, t) => `t${t}`),
    meta: { rank: i % 5 },
  };
  if (i % 13 === 0) delete d.size;
  return d;
});

const INDEXES = [
  { index: { fields: ['size'] }, ddoc: 'by-size', name: 'size' },
  { index: { fields: ['color', 'size'] }, ddoc: 'by-color-size', name: 'color-size' },
  { index: { fields: ['meta.rank'] }, ddoc: 'by-rank', name: 'rank' },
];

const QUERIES = [
  { selector: { size: { $gte: 10, $lt: 30 } }, sort: ['size'] },
  { selector: { size: { $gt: 90 } }, sort: [{ size: 'desc' }] },
  { selector: { color: 'red', size: { $gt: 0, $lt: 50 } }, sort: ['color', 'size'] },
  { selector: { color: 'blue' }, sort: [{ color: 'desc' }, { size: 'desc' }], limit: 7 },
  { selector: { 'meta.rank': 3, tags: { $size: 2 } } },
  { selector: { size: { $in: [1, 2, 3, 74, 75] } } },
  { selector: { $or: [{ color: 'green' }, { size: 5 }] }, limit: 200 },
  { selector: { name: { $regex: '^item 1[0-2]$' } }, limit: 200 },
  { selector: { tags: { $elemMatch: { $eq: 't1' } }, color: { $ne: 'red' } }, limit: 200 },
  { selector: { size: { $exists: false } } },
  { selector: { size: { $gte: 0 } }, sort: ['size'], skip: 10, limit: 5, fields: ['_id', 'size'] },
  { selector: { _id: { $gt: 'doc0100', $lte: 'doc0110' } } },
  { selector: { color: { $nin: ['red', 'blue'] }, 'meta.rank': { $gt: 2 } }, limit: 200 },
  { selector: { size: { $gte: 50 } }, sort: ['size'], limit: 40 },
  { selector: { size: { $lte: 20, $gt: 5 } }, sort: [{ size: 'desc' }] },
  { selector: { size: { $eq: 42 } } },
  { selector: { color: 'green', size: { $gte: 60 } }, sort: [{ color: 'desc' }, { size: 'desc' }] },
  { selector: { color: { $in: ['red', 'black'] }, size: { $mod: [10, 0] } }, limit: 200 },
  { selector: { 'meta.rank': { $gte: 1, $lte: 2 }, color: 'red' }, sort: ['meta.rank'], limit: 100 },
  { selector: { tags: { $all: ['t0', 't1'] } }, limit: 200 },
  { selector: { tags: { $size: 0 }, size: { $gte: 0, $lt: 10 } }, limit: 200 },
  { selector: { $and: [{ size: { $gt: 10 } }, { size: { $lt: 15 } }] }, sort: ['size'] },
  { selector: { $nor: [{ color: 'red' }, { color: 'green' }], size: { $gt: 95 } }, limit: 200 },
  { selector: { $not: { color: 'blue' }, 'meta.rank': 0 }, limit: 200 },
  { selector: { name: { $type: 'string' }, size: { $gt: 98 } }, limit: 200 },
  { selector: { tags: { $allMatch: { $eq: 't0' } }, size: { $gte: 0, $lt: 30 } }, limit: 200 },
  { selector: { name: { $in: ['item 1', 'item 2'] } }, fields: ['_id', 'name'], limit: 200 },
  { selector: { size: { $gte: 31 } }, sort: ['size'], limit: 10, skip: 30 },
];

test.before(async () => {
  node = await ThaliNode.start('find');
  dir = tempDir('find-local');
  local = new PouchDB(path.join(dir, 'local'));
  remote = new PouchDB(node.url('find'));
  await local.bulkDocs(DOCS);
  await remote.bulkDocs(DOCS);
});

test.after(async () => {
  await local.close();
  await remote.close();
  await node.destroy();
  fs.rmSync(dir, { recursive: true, force: true });
});

// Unsorted answers come in index order, which may differ between planners: compare as sets
// then, and in order when the query sorts. Revision ids differ (PouchDB makes random ones).
// pouchdb-find rewrites the query objects it is given: each call gets its own copy.
function same(q, a, b) {
  const ids = (r) => r.docs.map((d) => d._id);
  const bodies = (r) => r.docs.map(({ _rev, ...rest }) => rest);
  if (q.sort) {
    assert.deepEqual(bodies(b), bodies(a), JSON.stringify(q));
  } else {
    assert.deepEqual([...ids(b)].sort(), [...ids(a)].sort(), JSON.stringify(q));
  }
}

test('pouchdb-find creates the same indexes on thali', async () => {
  for (const idx of INDEXES) {
    const r = await remote.createIndex(idx);
    assert.equal(r.result, 'created');
    await local.createIndex(idx);
  }
  const again = await remote.createIndex(INDEXES[0]);
  assert.equal(again.result, 'exists');
  const list = await remote.getIndexes();
  assert.deepEqual(
    list.indexes.map((i) => i.name),
    ['_all_docs', 'color-size', 'rank', 'size'],
  );
  assert.deepEqual(list.indexes[1].def.fields, [{ color: 'asc' }, { size: 'asc' }]);
});

test('the same queries give the same answers from PouchDB and thali', async () => {
  for (const q of QUERIES) {
    const [a, b] = await Promise.all([local.find(structuredClone(q)), remote.find(structuredClone(q))]);
    assert.ok(b.docs.length > 0 || a.docs.length === 0, JSON.stringify(q));
    same(q, a, b);
  }
});

// One known difference, checked so it stays known: on a local database pouchdb-find matches
// `$lt` against documents that lack the field (the index sorts them first); CouchDB and thali
// do not, a missing field matches no comparison. (Another, not in QUERIES: with `$gt` and a
// `limit`, local pouchdb-find counts the rows equal to the bound toward the limit and returns
// fewer documents.)
test('a missing field matches no comparison on thali, as on CouchDB', async () => {
  const q = { selector: { color: 'red', size: { $lt: 50 } }, sort: ['color', 'size'] };
  const [a, b] = await Promise.all([local.find(structuredClone(q)), remote.find(structuredClone(q))]);
  assert.ok(b.docs.every((d) => typeof d.size === 'number' && d.size < 50));
  assert.ok(a.docs.some((d) => d.size === undefined), 'PouchDB still differs here');
  const present = a.docs.filter((d) => d.size !== undefined).map((d) => d._id);
  assert.deepEqual(b.docs.map((d) => d._id).slice(0, present.length), present);
});

test('explain names the index thali chose', async () => {
  const e = await remote.explain({ selector: { color: 'red', size: { $gt: 3 } } });
  assert.equal(e.index.name, 'color-size');
  const all = await remote.explain({ selector: { name: 'item 3' } });
  assert.equal(all.index.name, '_all_docs');
});

test('a sort no index serves is refused like CouchDB refuses it', async () => {
  await assert.rejects(remote.find({ selector: { name: { $gt: null } }, sort: ['name'] }), (e) => {
    assert.equal(e.status, 400);
    assert.equal(e.error, 'no_usable_index');
    return true;
  });
});

test('an index made on thali replicates to PouchDB and serves its queries', async () => {
  const fresh = new PouchDB(path.join(dir, 'fresh'));
  try {
    await PouchDB.replicate(remote, fresh);
    const idx = await fresh.getIndexes();
    assert.ok(idx.indexes.some((i) => i.name === 'color-size'), JSON.stringify(idx));
    const q = { selector: { color: 'black', size: { $gte: 0, $lt: 40 } }, sort: ['color', 'size'] };
    const [a, b] = await Promise.all([fresh.find(structuredClone(q)), remote.find(structuredClone(q))]);
    same(q, a, b);
    const e = await fresh.explain(q);
    assert.equal(e.index.name, 'color-size');
    await remote.deleteIndex((await remote.getIndexes()).indexes.find((i) => i.name === 'rank'));
    assert.deepEqual((await remote.getIndexes()).indexes.map((i) => i.name), ['_all_docs', 'color-size', 'size']);
  } finally {
    await fresh.close();
  }
});
