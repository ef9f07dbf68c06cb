// PouchDB-driven replication between two databases on one server; prints JSON timing.
// Usage: node bench-replicate.js <source url> <target url> [batch size, default 100]
'use strict';
const PouchDB = require('pouchdb');

(async () => {
  const [src, dst, batch] = process.argv.slice(2);
  const t0 = process.hrtime.bigint();
  const res = await PouchDB.replicate(new PouchDB(src), new PouchDB(dst), { batch_size: Number(batch || 100) });
  const ms = Number(process.hrtime.bigint() - t0) / 1e6;
  console.log(JSON.stringify({ ok: res.ok, docs_written: res.docs_written, ms }));
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
