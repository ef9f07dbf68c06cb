function(doc) if doc.type then emit(doc.type, {doc.n, 1}) end end
