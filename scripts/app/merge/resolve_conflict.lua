-- Merges concurrent edits the same way on every node (the same as plugins/merge in Rust):
-- a version marked "obsolete" deletes the document; else a version marked "final" is taken as
-- it is; else the winner's fields (docs[1]), with tags the sorted union of every version's
-- string tags and count the largest of their counts. Resolvers must be deterministic.
function(docs)
  for _, d in ipairs(docs) do
    if d.obsolete == true then return { _deleted = true } end
  end
  for _, d in ipairs(docs) do
    if d.final == true then return d end
  end
  local merged = {}
  for k, v in pairs(docs[1]) do merged[k] = v end
  local seen, tags, count = {}, {}, nil
  for _, d in ipairs(docs) do
    if type(d.tags) == "table" then
      for _, t in ipairs(d.tags) do
        if type(t) == "string" and not seen[t] then
          seen[t] = true
          tags[#tags + 1] = t
        end
      end
    end
    if type(d.count) == "number" and (count == nil or d.count > count) then
      count = d.count
    end
  end
  table.sort(tags)
  merged.tags = tags
  merged.count = count
  return merged
end
