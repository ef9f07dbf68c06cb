function(doc) if doc.key ~= nil then emit(doc.key, doc._id) end end
