function(doc) if doc.link then emit(doc._id, {_id = doc.link}) end end
