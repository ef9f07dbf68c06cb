// The same views run by thali (in JavaScript, the same design document PouchDB runs, and in Lua)
// and by PouchDB 9's own map/reduce (JavaScript) on the same documents: rows, totals and reduce results must match for every query, and collation of mixed
// key types must agree. One known, documented difference is checked too: PouchDB compares
// strings by UTF-16 code units ("incompatible with the CouchDB implementation", says
// pouchdb-collate), while thali, like CouchDB, uses the Unicode Collation Algorithm.
'use strict';
const test = require('node:test');
const assert = require('node:assert/strict');
const path = require('node:path');
const fs = require('node:fs');
const PouchDB = require('pouchdb');
const { ThaliNode, tempDir } = require('./harness');

let node;
let dir;
let local;
let remote;

// Keys on which UCA and code-unit order agree: every type, numbers, lower-case ASCII strings,
// arrays and objects (with their members in sorted order, as a Lua table hands them to emit).
function keyFor(i) {
  const words = ['apple', 'b', 'ba', 'banana', 'c', 'cherry', 'zz', '1', '10', '9'];
  switch (i % 9) {
    case 0: return null;
    case 1: return i % 2 === 0;
    case 2: return (i * 7919) % 1000 - 500;
    case 3: return ((i * 31) % 97) / 8;
    case 4: return words[i % words.length];
    case 5: return [words[i % 3], (i * 13) % 5];
    case 6: return [words[(i + 1) % 4]];
    case 7: return { a: i % 4, b: words[i % 2] };
    default: return [];
  }
}

const DOCS = Array.from({ length: 600 }, (_, i) => ({
  _id: `doc${String(i).padStart(4, '0')}`,
  key: keyFor(i),
  n: (i * 37) % 101,
  group: ['x', 'y', 'z'][i % 3],
  date: [2020 + (i % 3), 1 + (i % 12), 1 + (i % 28)],
}));

const JS = {
  _id: '_design/v',
  views: {
    by_key: { map: 'function (doc) { if (doc.key !== undefined) emit(doc.key, doc.n); }' },
    by_key_sum: { map: 'function (doc) { if (doc.key !== undefined) emit(doc.key, doc.n); }', reduce: '_sum' },
    by_date: { map: 'function (doc) { emit(doc.date, doc.n); }', reduce: '_sum' },
    by_group: { map: 'function (doc) { emit(doc.group, doc.n); }', reduce: '_stats' },
    counted: { map: 'function (doc) { emit(doc.group, null); }', reduce: '_count' },
    // JavaScript only: a custom reduce, rereduced across index chunks (PouchDB's local
    // map/reduce has no `require`, so modules are tested in tests/javascript.rs).
    custom: {
      map: 'function (doc) { emit(doc.date, doc.n * 2 + 1); }',
      reduce: 'function (keys, values, rereduce) { return rereduce ? sum(values) : sum(values) + 0.5 * values.length; }',
    },
  },
};
const LUA = {
  _id: '_design/v',
  language: 'lua',
  views: {
    by_key: { map: 'function(doc) if doc.key ~= nil then emit(doc.key, doc.n) end end' },
    by_key_sum: { map: 'function(doc) if doc.key ~= nil then emit(doc.key, doc.n) end end', reduce: '_sum' },
    by_date: { map: 'function(doc) emit(doc.date, doc.n) end', reduce: '_sum' },
    by_group: { map: 'function(doc) emit(doc.group, doc.n) end', reduce: '_stats' },
    counted: { map: 'function(doc) emit(doc.group, nil) end', reduce: '_count' },
  },
};

test.before(async () => {
  node = await ThaliNode.start('views');
  dir = tempDir('views-pouch');
  local = new PouchDB(path.join(dir, 'local'));
  remote = new PouchDB(node.url('views'));
  await remote.info(); // creates it
  await local.bulkDocs(DOCS);
  await remote.bulkDocs(DOCS);
  await local.put(JS);
  await remote.put(LUA);
  await remote.put({ ...JS, _id: '_design/vjs' });
});
test.after(async () => {
  await local.close();
  await node.destroy();
  fs.rmSync(dir, { recursive: true, force: true });
});

const QUERIES = [
  ['by_key', {}],
  ['by_key', { descending: true }],
  ['by_key', { limit: 17, skip: 40 }],
  ['by_key', { descending: true, limit: 9, skip: 3 }],
  ['by_key', { startkey: -100, endkey: 'c' }],
  ['by_key', { startkey: 'ba', endkey: 'cherry', inclusive_end: false }],
  ['by_key', { startkey: ['b'], endkey: [{}] }],
  ['by_key', { descending: true, startkey: {}, endkey: [] }],
  ['by_key', { key: 'banana' }],
  ['by_key', { key: ['apple', 3] }],
  ['by_key', { keys: ['zz', null, ['b'], 'nothing', 'apple'] }],
  ['by_key', { startkey: 'b', startkey_docid: 'doc0300', endkey: 'b', endkey_docid: 'doc0500' }],
  ['by_key', { key: 'b', include_docs: true, limit: 3 }],
  ['by_key_sum', {}],
  ['by_key_sum', { group: true }],
  ['by_key_sum', { group: true, descending: true, limit: 5 }],
  ['by_key_sum', { group: true, startkey: 'a', endkey: 'z' }],
  ['by_key_sum', { reduce: false, limit: 20 }],
  ['by_key_sum', { group: true, keys: ['zz', 'apple'] }],
  ['by_date', { group_level: 1 }],
  ['by_date', { group_level: 2, limit: 7 }],
  ['by_date', { group: true, startkey: [2021], endkey: [2021, {}] }],
  ['by_group', { group: true }],
  ['by_group', {}],
  ['counted', { group: true }],
  ['counted', {}],
];

// PouchDB's local map/reduce returns keys decoded from its indexable strings, and negative
// numbers come back a few ulps off (-364 as -364.00000000000006): compare numbers to 12
// significant digits.
function approx(v) {
  if (typeof v === 'number') return Number(v.toPrecision(12));
  if (Array.isArray(v)) return v.map(approx);
  if (v && typeof v === 'object') return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, approx(x)]));
  return v;
}

// What both must agree on. Revision ids differ (PouchDB hashes revisions its own way) and
// PouchDB's local map/reduce reports offset only for some queries; thali's offset is checked
// against CouchDB's rule in the Rust tests.
function comparable(res) {
  const out = { rows: res.rows.map((r) => {
    const row = { key: approx(r.key), value: approx(r.value) };
    if ('id' in r) row.id = r.id;
    if (r.doc) row.doc = { _id: r.doc._id, n: r.doc.n };
    return row;
  }) };
  if ('total_rows' in res) out.total_rows = res.total_rows;
  return out;
}

const JS_ONLY = [
  ['custom', {}],
  ['custom', { group_level: 1 }],
  ['custom', { group: true, limit: 10 }],
  ['custom', { reduce: false, limit: 25, skip: 5 }],
];

for (const [ddoc, queries] of [['v', QUERIES], ['vjs', [...QUERIES, ...JS_ONLY]]]) {
  const lang = ddoc === 'v' ? 'Lua' : 'JavaScript';
  for (const [view, opts] of queries) {
    test(`${lang} ${view} ${JSON.stringify(opts)} matches PouchDB`, async () => {
      const mine = comparable(await remote.query(`${ddoc}/${view}`, opts));
      const theirs = comparable(await local.query(`v/${view}`, opts));
      assert.ok(theirs.rows.length > 0 || mine.rows.length === 0);
      assert.deepStrictEqual(mine, theirs);
    });
  }
}

test('incremental updates keep matching PouchDB', async () => {
  for (const db of [local, remote]) {
    const d = await db.get('doc0004');
    await db.put({ ...d, key: 'moved', n: 1000 });
    const g = await db.get('doc0013');
    await db.remove(g);
    await db.put({ _id: 'extra', key: ['apple', 0], n: 5, group: 'x', date: [2020, 1, 1] });
  }
  for (const [view, opts] of [['by_key', {}], ['by_key_sum', { group: true }], ['by_date', { group_level: 2 }]]) {
    assert.deepStrictEqual(comparable(await remote.query(`v/${view}`, opts)), comparable(await local.query(`v/${view}`, opts)));
    assert.deepStrictEqual(comparable(await remote.query(`vjs/${view}`, opts)), comparable(await local.query(`v/${view}`, opts)));
  }
});

test('strings: thali collates like CouchDB (UCA), PouchDB by code units', async () => {
  const words = ['b', 'B', 'a', 'A', 'á', 'aa'];
  const docs = words.map((w, i) => ({ _id: `case${i}`, word: w }));
  const ddocJs = { _id: '_design/w', views: { w: { map: 'function (doc) { if (doc.word) emit(doc.word); }' } } };
  const ddocLua = { _id: '_design/w', language: 'lua', views: { w: { map: 'function(doc) if doc.word then emit(doc.word, nil) end end' } } };
  await local.bulkDocs([...docs, ddocJs]);
  await remote.bulkDocs([...docs, ddocLua, { ...ddocJs, _id: '_design/wjs' }]);
  const keys = async (db) => (await db.query('w/w')).rows.map((r) => r.key);
  assert.deepStrictEqual(await keys(remote), ['a', 'A', 'á', 'aa', 'b', 'B']);
  const jsKeys = (await remote.query('wjs/w')).rows.map((r) => r.key);
  assert.deepStrictEqual(jsKeys, ['a', 'A', 'á', 'aa', 'b', 'B']);
  assert.deepStrictEqual(await keys(local), ['A', 'B', 'a', 'aa', 'b', 'á']);
});
