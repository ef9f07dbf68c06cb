function(doc) if doc.type then emit(doc.type, doc.n) end end
