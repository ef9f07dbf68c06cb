-- Throws on one document: CouchDB (and thali) log it and index the others.
function(doc)
  if doc.n == 13 then error("unlucky document") end
  if doc.type then emit(doc.type, doc.n) end
end
