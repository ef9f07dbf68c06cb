function(doc) if type(doc.date) == "table" then emit(doc.date, doc.n) end end
