// The merge of ../merge/resolve_conflict.lua (and plugins/merge in Rust) in JavaScript: a version
// marked "obsolete" deletes the document; else a version marked "final" is taken as it is; else
// the winner's fields (docs[0]), with tags the sorted union of every version's string tags and
// count the largest of their counts. Resolvers must be deterministic.
function (docs) {
  for (const d of docs) if (d.obsolete === true) return { _deleted: true };
  for (const d of docs) if (d.final === true) return d;
  const merged = Object.assign({}, docs[0]);
  const tags = new Set();
  let count = null;
  for (const d of docs) {
    if (Array.isArray(d.tags)) for (const t of d.tags) if (typeof t === "string") tags.add(t);
    if (typeof d.count === "number" && (count === null || d.count > count)) count = d.count;
  }
  merged.tags = [...tags].sort();
  merged.count = count;
  return merged;
}
